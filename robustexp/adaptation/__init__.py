"""Test-time adaptation; ``conf/adaptation/<name>.yaml`` selects variants with ``+adaptation=<name>``."""

from robustexp.adaptation.bn import BatchNormAdaptation, NoAdaptation
from robustexp.adaptation.tent import TentAdaptation

__all__ = ["BatchNormAdaptation", "NoAdaptation", "TentAdaptation"]
