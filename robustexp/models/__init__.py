"""Classifiers that take images in [0, 1]: normalization lives inside the model."""

from robustexp.models.build import NormalizedClassifier, build_model, load_weights

__all__ = ["NormalizedClassifier", "build_model", "load_weights"]
