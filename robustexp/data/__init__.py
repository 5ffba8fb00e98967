"""Datasets (embedded and on disk), corruption engines and -C benchmarks."""

from robustexp.data.base import DataSplits, TensorImageDataset

__all__ = ["DataSplits", "TensorImageDataset"]
