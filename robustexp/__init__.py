"""robustexp: train, adapt and evaluate image classifiers under common corruptions."""

__version__ = "0.1.0"
