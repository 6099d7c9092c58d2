"""One module per CLI command (train, predict, evaluate, report, export, audit, check-data, cache).
May import outputs/, model/, data/ and the top-level helpers; never each other."""
