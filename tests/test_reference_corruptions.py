"""The adapter around the reference ImageNet-C package."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustexp.data.corruptions import ALL_CORRUPTIONS, resolve_corruptions
from robustexp.data.corruptions.reference import LUMA_WEIGHTS, ReferenceCorruptionEngine, corrupt_uint8
from robustexp.data.embedded import load_mnist5k
from robustexp.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    images, _ = load_mnist5k()
    return images[:8].float() / 255


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_every_corruption_runs_on_28px_gray_and_is_seeded(digits, name):
    engine = ReferenceCorruptionEngine(workers=1)
    a = engine(digits, name, 3, seed=1)
    b = engine(digits, name, 3, seed=1)
    assert a.shape == digits.shape and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    if name == "saturate":  # scales the saturation (x2, + 0 at severity 3): gray images have none
        assert torch.equal(a, digits)
    else:
        assert not torch.equal(a, digits)  # every other corruption changes something at severity 3


def test_seed_changes_random_corruptions(digits):
    engine = ReferenceCorruptionEngine(workers=1)
    assert not torch.equal(engine(digits, "gaussian_noise", 2, 0), engine(digits, "gaussian_noise", 2, 1))


def test_gray_convention_is_rgb_then_luma(digits):
    """Gray images are replicated to RGB, corrupted, and mapped back with the 601 luma weights, rounded."""
    from PIL import Image

    from robustexp.data.corruptions.reference import _reference_functions

    gray = (digits[:2] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = corrupt_uint8(gray, "brightness", 2, seed=0)[..., 0]
    rgb = np.repeat(gray[0], 3, axis=-1)
    reference = np.asarray(_reference_functions()["brightness"](Image.fromarray(rgb), 2), dtype=np.float64)
    assert np.array_equal(out[0], np.uint8(np.clip(np.rint(reference @ LUMA_WEIGHTS), 0, 255)))
    # an exact gray level survives the round trip through RGB and luma (no truncation artifact)
    flat = np.full((1, 4, 4, 1), 100, np.uint8)
    rgb = corrupt_uint8(np.repeat(flat, 3, -1), "contrast", 1, seed=0)
    assert (corrupt_uint8(flat, "contrast", 1, seed=0) == rgb[..., :1]).all()


def test_gaussian_noise_has_the_reference_sigma():
    flat = torch.full((4, 3, 32, 32), 0.5)
    out = ReferenceCorruptionEngine(workers=1)(flat, "gaussian_noise", 1, seed=0)
    assert abs(float((out - 0.5).std()) - 0.08) < 0.004  # severity 1: sigma 0.08, clipping negligible at 0.5


def test_impulse_noise_is_seeded_and_hits_the_configured_fraction():
    flat = torch.full((4, 3, 32, 32), 128 / 255)  # an exact 8-bit level
    engine = ReferenceCorruptionEngine(workers=1)
    out = engine(flat, "impulse_noise", 3, seed=0)
    assert torch.equal(out, engine(flat, "impulse_noise", 3, seed=0))
    assert not torch.equal(out, engine(flat, "impulse_noise", 3, seed=1))
    assert abs(float((out != flat).float().mean()) - 0.09) < 0.015  # severity 3: amount 0.09


def test_worker_count_does_not_change_results(digits):
    many = digits.repeat(20, 1, 1, 1)  # 160 images = 3 chunks
    one = ReferenceCorruptionEngine(workers=1)(many, "shot_noise", 4, seed=5)
    engine = ReferenceCorruptionEngine(workers=2)
    try:
        two = engine(many, "shot_noise", 4, seed=5)
    finally:
        engine.close()
    assert torch.equal(one, two)


def test_bad_names_and_severities():
    engine = ReferenceCorruptionEngine(workers=1)
    with pytest.raises(ConfigError, match="unknown corruption 'rain'"):
        engine(torch.rand(1, 1, 28, 28), "rain", 1, 0)
    with pytest.raises(ConfigError, match="severity must be 1..5"):
        engine(torch.rand(1, 1, 28, 28), "fog", 6, 0)
    assert resolve_corruptions("noise") == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert len(resolve_corruptions("common")) == 15 and len(resolve_corruptions("holdout")) == 4
    with pytest.raises(ConfigError, match=r"unknown imagenet_c corruption\(s\) \['rain'\]"):
        resolve_corruptions(["fog", "rain"])
    assert resolve_corruptions("common", "mnist_c")[-1] == "canny_edges"
    with pytest.raises(ConfigError, match="unknown mnist_c corruption"):
        resolve_corruptions(["frost"], "mnist_c")
