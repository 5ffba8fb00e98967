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
# The M = 18 corruptions of the mCA of Tsiligkaridis & Tsiligkaridis 2022 (Sec. 4, "Datasets": "a
# total of M=18 corruptions at J=5 severity levels. The 'gaussian noise' corruption is excluded from
# our evaluations"; their Table 1 lists exactly these 18): the 15 test and 4 hold-out corruptions
# without gaussian_noise.
ALL_BUT_GAUSSIAN_NOISE = tuple(c for c in ALL_CORRUPTIONS if c != "gaussian_noise")

# MNIST-C (Mu & Gilmer 2019): 15 corruptions, one fixed strength each (reported as severity 1)
MNIST_C_CORRUPTIONS = ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate",
                       "brightness", "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag",
                       "canny_edges")

FAMILIES = {
    "imagenet_c": {"common": TEST_CORRUPTIONS, "test": TEST_CORRUPTIONS, "holdout": HOLDOUT_CORRUPTIONS,
                   "all": ALL_CORRUPTIONS, "all_but_gaussian_noise": ALL_BUT_GAUSSIAN_NOISE,
                   **CORRUPTION_CATEGORIES},
    "mnist_c": {"common": MNIST_C_CORRUPTIONS, "all": MNIST_C_CORRUPTIONS,
                "noise": ("shot_noise", "impulse_noise")},
}
FAMILY_SEVERITIES = {"imagenet_c": (1, 2, 3, 4, 5), "mnist_c": (1,)}


def resolve_corruptions(spec: str | Sequence[str], family: str = "imagenet_c") -> tuple[str, ...]:
    """A named set of the family ('common', 'holdout', 'all', 'all_but_gaussian_noise' (the 18 of
    the MAGN paper's mCA), 'noise', 'blur', 'weather', 'digital' for ImageNet-C; 'common' / 'all'
    for MNIST-C) or a list of names."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown corruption family {family!r}; expected one of {list(FAMILIES)}")
    sets = FAMILIES[family]
    if isinstance(spec, str):
        if spec in sets:
            return sets[spec]
        spec = [spec]
    names = tuple(spec)
    universe = sets["all"]
    unknown = [n for n in names if n not in universe]
    if unknown:
        raise ConfigError(f"unknown {family} corruption(s) {unknown}; expected names from {list(universe)} "
                          f"or one of the sets {list(sets)}")
    return names


def check_corruption_request(images, name: str, severity: int) -> None:
    """The checks every ImageNet-C engine makes on a call ``engine(images, name, severity, seed)``."""
    if name not in ALL_CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; expected one of {list(ALL_CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ConfigError(f"corruption severity must be 1..5, got {severity}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
