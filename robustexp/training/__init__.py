from robustexp.training.trainer import Trainer

__all__ = ["Trainer"]
