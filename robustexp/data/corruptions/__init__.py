"""ImageNet-C corruption names and engines that generate them."""

from robustexp.data.corruptions.names import (
    ALL_CORRUPTIONS,
    CORRUPTION_CATEGORIES,
    HOLDOUT_CORRUPTIONS,
    TEST_CORRUPTIONS,
    resolve_corruptions,
)

__all__ = ["ALL_CORRUPTIONS", "CORRUPTION_CATEGORIES", "HOLDOUT_CORRUPTIONS", "TEST_CORRUPTIONS",
           "resolve_corruptions"]
