"""Networks, devices, checkpoints and the steps that train and run them (feature cache, inference).
May import data/ and the top-level helpers; never outputs/ or commands/. Kept torch-free here."""
