"""Test-time adaptation; ``conf/adaptation/<name>.yaml`` selects variants with ``+adaptation=<name>``."""

from robustexp.adaptation.bn import BatchNormAdaptation, NoAdaptation

__all__ = ["BatchNormAdaptation", "NoAdaptation"]
