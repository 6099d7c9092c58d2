"""What comes out of a model: metrics, evaluations, plots, HTML pages and batch-predict's files.
May import model/, data/ and the top-level helpers; never commands/."""
