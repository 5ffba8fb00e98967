"""Training objectives, one per file; ``conf/method/<name>.yaml`` selects one with ``+method=<name>``."""

from robustexp.methods.base import TrainingMethod
from robustexp.methods.standard import StandardTraining

__all__ = ["StandardTraining", "TrainingMethod"]
