"""The 15 test and 4 hold-out corruptions of ImageNet-C (Hendrycks & Dietterich, 2019)."""

from __future__ import annotations

from collections.abc import Sequence

from robustexp.errors import ConfigError

CORRUPTION_CATEGORIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
TEST_CORRUPTIONS = tuple(c for group in CORRUPTION_CATEGORIES.values() for c in group)
HOLDOUT_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = TEST_CORRUPTIONS + HOLDOUT_CORRUPTIONS
NOISE_CORRUPTIONS = CORRUPTION_CATEGORIES["noise"]

_NAMED_SETS = {"common": TEST_CORRUPTIONS, "test": TEST_CORRUPTIONS, "holdout": HOLDOUT_CORRUPTIONS,
               "all": ALL_CORRUPTIONS, **CORRUPTION_CATEGORIES}


def resolve_corruptions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A named set ('common', 'holdout', 'all', 'noise', 'blur', 'weather', 'digital') or a list of names."""
    if isinstance(spec, str):
        if spec in _NAMED_SETS:
            return _NAMED_SETS[spec]
        spec = [spec]
    names = tuple(spec)
    unknown = [n for n in names if n not in ALL_CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruption(s) {unknown}; expected names from {list(ALL_CORRUPTIONS)} "
                          f"or one of the sets {list(_NAMED_SETS)}")
    return names
