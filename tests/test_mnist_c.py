"""The MNIST-C engine: interface, seeding, and each corruption against its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robustexp.data.corruptions.engine import plasma_fractal
from robustexp.data.corruptions.mnist_c import (
    MNIST_C_CORRUPTIONS,
    MNIST_C_NAMES,
    MnistCCorruptionEngine,
    canny,
    glass_blur_permutation,
    line_from_points,
    rotate_images,
    scale_images,
    shear_images,
    translate_images,
    zigzag_vertices,
)
from robustexp.data.embedded import load_mnist5k
from robustexp.errors import ConfigError
from robustexp.utils import derive_seed

ENGINE = MnistCCorruptionEngine()
DETERMINISTIC = {"identity", "scale", "brightness", "stripe", "canny_edges"}
RANDOM = [n for n in MNIST_C_CORRUPTIONS if n not in DETERMINISTIC]
CENTRE = 13.5


@pytest.fixture(scope="module")
def mnist() -> torch.Tensor:
    images, _ = load_mnist5k()
    return images[:400].float() / 255


@pytest.fixture(scope="module")
def digits(mnist) -> torch.Tensor:
    return mnist[:48]


def centroid(images: torch.Tensor) -> torch.Tensor:
    """(B, 2) intensity-weighted (col, row) centre of mass of (B, 1, H, W) images."""
    _, _, h, w = images.shape
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    weights = images[:, 0].double()
    mass = weights.sum(dim=(1, 2))
    return torch.stack([(weights * cols).sum(dim=(1, 2)) / mass, (weights * rows).sum(dim=(1, 2)) / mass], 1)


# ------------------------------------------------------------------ interface


def test_names_are_the_benchmark_corruptions():
    assert MNIST_C_CORRUPTIONS == ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale",
                                   "rotate", "brightness", "translate", "stripe", "fog", "spatter", "dotted_line",
                                   "zigzag", "canny_edges")
    assert MNIST_C_NAMES == ("identity",) + MNIST_C_CORRUPTIONS
    assert ENGINE.name == "mnist_c"
    ENGINE.close()


@pytest.mark.parametrize("name", MNIST_C_NAMES)
def test_output_shape_dtype_and_range(digits, name):
    out = ENGINE(digits, name, None, seed=0)
    assert out.shape == digits.shape and out.dtype == digits.dtype and out.device == digits.device
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    changed = (out != digits).flatten(1).any(1).float().mean().item()
    if name == "identity":
        assert changed == 0
    elif name == "spatter":  # mud need not land on every digit
        assert changed > 0.5
    else:
        assert changed == 1.0


@pytest.mark.parametrize("name", MNIST_C_NAMES)
def test_other_sizes_channels_and_float64(name):
    images = torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = ENGINE(images, name, 1, seed=3)
    assert out.shape == images.shape and out.dtype == torch.float64
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    gray = ENGINE(images[:, :1, :20, :24].contiguous(), name, 1, seed=3)
    assert gray.shape == (3, 1, 20, 24)


@pytest.mark.parametrize("name", MNIST_C_NAMES)
def test_seed_determinism_and_sensitivity(digits, name):
    x = digits[:16]
    first = ENGINE(x, name, None, seed=11)
    assert torch.equal(first, ENGINE(x, name, 1, seed=11))  # same seed (severity None == 1)
    other = ENGINE(x, name, None, seed=12)
    if name in DETERMINISTIC:
        assert torch.equal(first, other)
    else:
        assert not torch.equal(first, other)


@pytest.mark.parametrize("name", RANDOM)
def test_randomness_is_per_image(digits, name):
    """The same digit 16 times in one batch gets (at least two) different corruptions."""
    x = digits[:1].expand(16, -1, -1, -1).contiguous()
    out = ENGINE(x, name, None, seed=5).flatten(1)
    distinct = len({tuple(row.tolist()) for row in out})
    assert distinct >= 2


def test_identity_is_a_copy(digits):
    out = ENGINE(digits, "identity", None, seed=0)
    assert torch.equal(out, digits) and out.data_ptr() != digits.data_ptr()


@pytest.mark.parametrize("severity", [0, 2, 3, 5, True])
def test_rejects_severities_other_than_one(digits, severity):
    with pytest.raises(ConfigError, match="severity"):
        ENGINE(digits, "rotate", severity, seed=0)


def test_rejects_unknown_names_listing_the_valid_ones(digits):
    with pytest.raises(ConfigError, match="zigzag") as info:
        ENGINE(digits, "gaussian_noise", None, seed=0)
    assert "canny_edges" in str(info.value) and "gaussian_noise" in str(info.value)


# ------------------------------------------------------------------ affine corruptions


def test_rotate_lands_a_pixel_where_hand_computed():
    """A pixel at (col 22, row 14) is 8.5 right and 0.5 below the centre (13.5, 13.5).
    warp(inverse_map=R(a)) puts it at R(-a) v + c:
      a = +0.4: (8.5 cos .4 + 0.5 sin .4, -8.5 sin .4 + 0.5 cos .4) = (8.024, -2.850) -> (21.524, 10.650)
      a = -0.4: (8.5 cos .4 - 0.5 sin .4,  8.5 sin .4 + 0.5 cos .4) = (7.634,  3.771) -> (21.134, 17.271)
    """
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 14, 22] = 1.0
    expected = {+1: torch.tensor([21.524, 10.650]), -1: torch.tensor([21.134, 17.271])}
    for sign, spot in expected.items():
        out = rotate_images(image, torch.tensor([sign * 0.4]))
        assert (centroid(out)[0].float() - spot).norm() < 0.25
        peak = divmod(int(out.flatten().argmax()), 28)  # (row, col) of the brightest output pixel
        assert abs(peak[0] - spot[1]) <= 0.5 + 1e-6 and abs(peak[1] - spot[0]) <= 0.5 + 1e-6
    # the engine rotates each image by +0.4 or -0.4 rad
    outs = ENGINE(image.expand(16, -1, -1, -1), "rotate", None, seed=2)
    landed = [min(expected, key=lambda s: (c.float() - expected[s]).norm()) for c in centroid(outs)]
    for c, s in zip(centroid(outs), landed):
        assert (c.float() - expected[s]).norm() < 0.25
    assert set(landed) == {+1, -1}


def _skimage_warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """MNIST-C's warp: ``AffineTransform`` with the translation that fixes (13.5, 13.5)."""
    from skimage import transform

    (a1, a2), (b1, b2) = matrix
    full = np.array([[a1, a2, CENTRE * (1 - a1 - a2)], [b1, b2, CENTRE * (1 - b1 - b2)], [0, 0, 1]])
    return transform.warp(image, inverse_map=transform.AffineTransform(matrix=full))


def test_affine_corruptions_match_skimage_warp(mnist):
    """rotate / shear / scale against skimage.transform.warp with the benchmark's matrices (shear
    written out as the matrix of skimage <= 0.19's ``AffineTransform(shear=s)``)."""
    x = mnist[:40].double()
    cos, sin = math.cos(0.4), math.sin(0.4)
    cases = [
        (rotate_images(x, torch.full((40,), 0.4)), np.array([[cos, -sin], [sin, cos]])),
        (rotate_images(x, torch.full((40,), -0.4)), np.array([[cos, sin], [-sin, cos]])),
        (shear_images(x, torch.full((40,), 0.4)), np.array([[1, -sin], [0, cos]])),
        (shear_images(x, torch.full((40,), -0.4)), np.array([[1, sin], [0, cos]])),
        (scale_images(x, 1 / 0.7), np.eye(2) / 0.7),
    ]
    for ours, matrix in cases:
        reference = np.stack([_skimage_warp(im, matrix) for im in x[:, 0].numpy()])
        assert np.abs(ours[:, 0].numpy() - reference).max() < 1e-6
    from skimage import transform

    ours = translate_images(x, torch.full((40,), 3), torch.full((40,), -3))
    reference = np.stack([transform.warp(im, inverse_map=transform.AffineTransform(translation=[3, -3]))
                          for im in x[:, 0].numpy()])
    assert np.abs(ours[:, 0].numpy() - reference).max() < 1e-12
    # out(x, y) = in(x + 3, y - 3): the pixel at (row 10, col 10) lands at (row 13, col 7)
    pixel = torch.zeros(1, 1, 28, 28)
    pixel[0, 0, 10, 10] = 1.0
    moved = translate_images(pixel, torch.tensor([3]), torch.tensor([-3]))
    assert moved[0, 0, 13, 7] == 1.0 and moved.sum() == 1.0


def test_engine_shear_and_rotate_use_plus_or_minus_point_four(digits):
    x = digits[:16]
    for name, fn in (("shear", shear_images), ("rotate", rotate_images)):
        out = ENGINE(x, name, None, seed=4)
        plus, minus = fn(x, torch.full((16,), 0.4)), fn(x, torch.full((16,), -0.4))
        is_plus = ((out - plus).flatten(1).abs().amax(1) < 1e-6)
        is_minus = ((out - minus).flatten(1).abs().amax(1) < 1e-6)
        assert (is_plus | is_minus).all() and is_plus.any() and is_minus.any()


def test_translate_moves_the_centre_of_mass_by_the_drawn_offset(mnist):
    """out(x, y) = in(x + dx, y + dy) with dx, dy in {-3, +3}: the centre of mass moves by
    (-dx, -dy) exactly when no ink leaves the image."""
    x = mnist[:64]
    out = ENGINE(x, "translate", None, seed=0)
    kept = (out.sum(dim=(1, 2, 3)) - x.sum(dim=(1, 2, 3))).abs() < 1e-3
    assert kept.float().mean() > 0.75
    shift = (centroid(out) - centroid(x))[kept]
    assert ((shift.abs() - 3).abs() < 1e-4).all()
    assert len({(int(round(a)), int(round(b))) for a, b in shift.tolist()}) == 4  # all sign pairs occur
    for (ddx, ddy), image, corrupted in zip(shift.tolist(), x[kept], out[kept]):
        dx, dy = torch.tensor([-round(ddx)]), torch.tensor([-round(ddy)])
        assert torch.equal(translate_images(image[None], dx, dy), corrupted[None])


def test_scale_multiplies_the_second_moment_by_the_factor_squared(mnist):
    """Inverse-map scale 1/0.7 shrinks the digit 0.7x about the centre: the intensity-weighted
    mean squared distance to (13.5, 13.5) becomes 0.49x."""
    x = mnist[:200]
    out = ENGINE(x, "scale", None, seed=0)

    def second_moment(images):
        rows = torch.arange(28, dtype=torch.float64).view(1, 28, 1) - CENTRE
        cols = torch.arange(28, dtype=torch.float64).view(1, 1, 28) - CENTRE
        weights = images[:, 0].double()
        return (weights * (rows ** 2 + cols ** 2)).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))

    ratio = second_moment(out) / second_moment(x)
    assert abs(ratio.mean().item() - 0.49) < 0.01
    assert ((ratio - 0.49).abs() < 0.03).all()


# ------------------------------------------------------------------ canny


def test_canny_agrees_with_skimage_on_real_digits(mnist):
    """Edge maps of 400 digits (float64) against skimage.feature.canny (sigma 1, 0.1 / 0.2):
    we measure IoU = |ours & ref| / |ours | ref| over all edge pixels, and the share of digits
    whose maps are identical."""
    from skimage.feature import canny as skimage_canny

    x = mnist.double()
    ours = canny(x)[:, 0].numpy().astype(bool)
    reference = np.stack([skimage_canny(im) for im in x[:, 0].numpy()])
    iou = (ours & reference).sum() / (ours | reference).sum()
    identical = (ours == reference).all(axis=(1, 2)).mean()
    assert iou >= 0.99 and identical >= 0.95
    # the engine's float32 path gives a 0/1 map of the same edges
    out = ENGINE(mnist[:64], "canny_edges", None, seed=0)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    agree = (out[:, 0].numpy().astype(bool) == reference[:64]).mean()
    assert agree >= 0.999


def test_canny_agrees_with_skimage_on_noise():
    """Harder cases than digits: uniform noise at full contrast (edges everywhere) and at contrast
    0.2, where most weak (>= 0.1) edge pixels lie in components without a strong (>= 0.2) one, so
    the hysteresis step decides (1,808 edges out of 5,330 weak candidates)."""
    from skimage.feature import canny as skimage_canny

    noise = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for x in (noise, 0.2 * noise):
        ours = canny(x)[:, 0].numpy().astype(bool)
        reference = np.stack([skimage_canny(im) for im in x[:, 0].numpy()])
        assert (ours & reference).sum() / (ours | reference).sum() >= 0.99
    weak = canny(0.2 * noise, high_threshold=0.1)  # the same edges without the high threshold
    assert weak.sum() > 2 * canny(0.2 * noise).sum()


# ------------------------------------------------------------------ noise


def test_impulse_noise_replaces_the_configured_fraction():
    """s&p with amount 0.17: ~17% of pixels become 0 or 1, half of them 1; the rest are untouched."""
    x = torch.full((64, 1, 28, 28), 0.5)
    out = ENGINE(x, "impulse_noise", None, seed=0)
    changed = out != 0.5
    assert abs(changed.float().mean().item() - 0.17) < 0.01  # 50,176 pixels: sd 0.0017
    assert set(out[changed].unique().tolist()) <= {0.0, 1.0}
    assert abs((out[changed] == 1).float().mean().item() - 0.5) < 0.03


def _clipped_poisson_moments(level: float, rate: float = 3.0) -> tuple[float, float]:
    """Mean and variance of clip(Poisson(level * rate) / rate, 0, 1)."""
    from scipy.stats import poisson

    k = np.arange(0, 60)
    p = poisson.pmf(k, level * rate)
    v = np.clip(k / rate, 0, 1)
    mean = (p * v).sum()
    return mean, (p * (v - mean) ** 2).sum()


def test_shot_noise_statistics_match_poisson_rate_3():
    """clip(Poisson(3x) / 3): values on the 1/3 grid, zero stays zero, mean ~ x, variance ~ x / 3
    (exact moments of the clipped law compared, 50,176 pixels per level)."""
    variances = {}
    for level in (0.1, 0.2, 0.4):
        x = torch.full((64, 1, 28, 28), level)
        out = ENGINE(x, "shot_noise", None, seed=1).double()
        assert torch.allclose(out * 3, (out * 3).round(), atol=1e-5)
        mean, var = _clipped_poisson_moments(level)
        assert abs(out.mean().item() - mean) < 0.01 * level + 0.002
        assert abs(out.var().item() / var - 1) < 0.05
        variances[level] = out.var().item()
    assert abs(variances[0.2] / variances[0.1] - 2) < 0.15  # variance grows linearly with x
    assert torch.equal(ENGINE(torch.zeros(2, 1, 28, 28), "shot_noise", None, seed=0), torch.zeros(2, 1, 28, 28))


# ------------------------------------------------------------------ blurs


def test_glass_blur_shuffle_is_a_local_permutation_and_blur_keeps_constants():
    rng = np.random.default_rng(0)
    shape = (2, 26 * 26, 5)
    index = glass_blur_permutation(rng.random(shape) < 0.5, rng.integers(-1, 1, shape), rng.integers(-1, 1, shape),
                                   28, 28, 1)
    for row in index:
        assert sorted(row.tolist()) == list(range(28 * 28))
        grid = row.reshape(28, 28)
        assert (grid[0] == np.arange(28)).all() and (grid[:, 0] == np.arange(0, 784, 28)).all()  # never visited
    assert (index != np.arange(784)).mean() > 0.3
    # a constant image stays constant, at the 8-bit truncation floor(255 c) / 255
    out = ENGINE(torch.full((4, 1, 28, 28), 0.5), "glass_blur", None, seed=0)
    assert torch.allclose(out, torch.full_like(out, 127 / 255), atol=1e-6)


def test_glass_blur_blurs_vertically_only():
    """MNIST-C's gaussian(..., multichannel=True) on a 2-D image blurs along rows only. A vertical
    line at column 14: swaps move a pixel right by at most one column per iteration (2 iterations)
    and a vertical blur never spreads sideways, so columns >= 17 stay exactly 0 (a 2-D blur would
    make every column nonzero); a horizontal bar is smeared across rows."""
    line = torch.zeros(32, 1, 28, 28)
    line[..., 14] = 1.0
    out = ENGINE(line, "glass_blur", None, seed=0)[:, 0]
    assert out[..., 17:].sum() == 0
    assert (out[..., :11] > 0).float().mean() < 0.05
    bars = torch.zeros(8, 1, 28, 28)
    bars[:, :, 13:15, 4:24] = 1.0
    out = ENGINE(bars, "glass_blur", None, seed=0)
    assert (out[:, :, 10:12, 8:20] > 0).float().mean() > 0.5


def test_motion_blur_smears_a_pixel_along_the_drawn_direction():
    """ImageMagick motion blur (radius 10, sigma 3, |angle| <= 45 deg): the output at the pixel is
    the first tap weight 1 / sum_i exp(-i^2 / 18), mass is kept, and the smear lies to the left
    within 45 degrees of the row."""
    k0 = 1 / sum(math.exp(-i * i / 18) for i in range(21))
    image = torch.zeros(16, 1, 28, 28)
    image[:, 0, 14, 14] = 1.0
    out = ENGINE(image, "motion_blur", None, seed=0)
    assert torch.allclose(out[:, 0, 14, 14], torch.full((16,), k0), atol=1e-6)
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.ones(16), atol=1e-4)
    rows, cols = torch.nonzero(out[:, 0] > 1e-7, as_tuple=True)[1:]
    assert (cols <= 14).all() and ((rows - 14).abs() <= 14 - cols + 1).all()
    assert len({tuple(r.tolist()) for r in (out[:, 0] > 1e-7).flatten(1)}) > 4  # angles differ per image
    constant = ENGINE(torch.full((2, 1, 28, 28), 0.3), "motion_blur", None, seed=0)
    assert torch.allclose(constant, torch.full_like(constant, 0.3), atol=1e-6)


# ------------------------------------------------------------------ the rest


def test_brightness_adds_half_to_the_hsv_value():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ENGINE(x, "brightness", None, seed=0), (x + 0.5).clamp(0, 1))
    from skimage.color import hsv2rgb, rgb2hsv

    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rgb[0, :, 0, 0] = torch.tensor([0.2, 0.1, 0.0])
    out = ENGINE(rgb, "brightness", None, seed=0)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.7, 0.35, 0.0], dtype=torch.float64))
    hsv = rgb2hsv(rgb.permute(0, 2, 3, 1).numpy())
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.5, 0, 1)
    assert np.abs(out.permute(0, 2, 3, 1).numpy() - hsv2rgb(hsv)).max() < 1e-9


def test_stripe_inverts_the_outer_quarters(digits):
    out = ENGINE(digits, "stripe", None, seed=0)
    assert torch.equal(out[..., :7], 1 - digits[..., :7]) and torch.equal(out[..., 21:], 1 - digits[..., 21:])
    assert torch.equal(out[..., 7:21], digits[..., 7:21])


def test_line_profile_is_hand_computed():
    """line_from_points(0, 10, 27, 10): 1 on row 10, log(1 - 1/2.3) + 1 = 0.4290 on rows 9 and 11,
    0 beyond (log(1 - 2/2.3) + 1 < 0), and the column ceil(27) = 27 is blanked."""
    t = torch.tensor
    line = line_from_points(t([0.0]), t([10.0]), t([27.0]), t([10.0]), 28, 28)[0]
    assert torch.allclose(line[10, :27], torch.ones(27))
    assert torch.allclose(line[[9, 11], :27], torch.full((2, 27), math.log(1 - 1 / 2.3) + 1))
    assert line[:9].sum() == 0 and line[12:].sum() == 0 and line[:, 27].sum() == 0


def test_dotted_line_draws_every_other_dash():
    out = ENGINE(torch.zeros(32, 1, 28, 28), "dotted_line", None, seed=0)[:, 0]
    cols = torch.arange(28)
    dashes = ((cols // 2) % 2 == 1) & (cols < 27)
    assert out[..., ~dashes].sum() == 0
    assert (out[..., dashes].amax(dim=1) >= 0.75).all()  # the line crosses every dash column
    assert ((out[..., dashes] > 0).sum(dim=1) <= 5).all()  # within 2.3 px of the line
    assert len({tuple(o.flatten().tolist()) for o in out}) >= 24  # 27 x 27 (r0, r1) pairs


def test_zigzag_vertices_and_drawing():
    """theta = 0 (r1 = r0 = 10): vertices (2, 10), then (2 + (2i + 1) * 2, 10 +- 2) for i < 6, and the
    closing point (2 + 23, 10 - 2 / (2 * (23 - 20))) = (25, 9.667)."""
    cols, rows = zigzag_vertices(torch.tensor([10]), torch.tensor([10]), 2.0, 25.0)
    assert torch.allclose(cols[0], torch.tensor([2, 4, 8, 12, 16, 20, 24, 25], dtype=torch.float64))
    assert torch.allclose(rows[0], torch.tensor([10, 12, 8, 12, 8, 12, 8, 10 - 1 / 3], dtype=torch.float64))
    out = ENGINE(torch.zeros(32, 1, 28, 28), "zigzag", None, seed=0)[:, 0]
    assert out[..., :2].sum() == 0 and out[..., 26:].sum() == 0
    assert (out.flatten(1).amax(1) > 0.5).all()
    inside = (out[..., 2:25].amax(dim=1) > 0.5).all(dim=1)  # zigzags that do not leave the image
    assert inside.float().mean() > 0.5
    peaks = out[inside][..., 2:25].argmax(dim=1).double()  # row of the line in each column
    turns = (torch.sign(peaks[:, 1:] - peaks[:, :-1]).diff(dim=1) != 0).sum(dim=1)
    assert (turns >= 4).all()  # it zigzags, not a straight line


def test_fog_adds_a_normalized_plasma_and_rescales_by_the_maximum(digits):
    x = digits[:16]
    out = ENGINE(x, "fog", None, seed=0)
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    assert (out <= top + 1e-6).all()
    plasma = (out * (top + 3.0) / top - x) / 3.0  # invert (x + 3 p) * top / (top + 3)
    assert plasma.min() > -1e-5 and plasma.max() < 1 + 1e-5
    assert plasma.flatten(1).std(1).min() > 0.02 and not torch.allclose(plasma[0], plasma[1])
    # the same generator stream gives the engine's plasma: out = (x + 3 p) * top / (top + 3) exactly
    generator = torch.Generator().manual_seed(derive_seed(0, "fog"))
    p = plasma_fractal(16, 256, 1.4, generator, "cpu")[:, None, :28, :28]
    assert torch.allclose(out, (x + 3.0 * p) * top / (top + 3.0), atol=1e-6)
    maps = plasma_fractal(3, 256, 1.4, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(maps.flatten(1).amin(1), torch.zeros(3))
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(3))


def test_spatter_blends_towards_mud_where_the_mask_is_dense():
    """m is 0 or >= 0.8, and the result is x (1 - m) + 63/255 m: on black images every pixel is 0
    or in [0.8 * 63/255, 63/255]."""
    out = ENGINE(torch.zeros(64, 1, 28, 28), "spatter", None, seed=0)
    mud = out[out > 0]
    assert mud.numel() > 0
    assert mud.min() >= 0.8 * 63 / 255 - 1e-6 and mud.max() <= 63 / 255 + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(digits):
    x = digits.cuda()
    for name in MNIST_C_NAMES:
        out = ENGINE(x, name, None, seed=0)
        assert out.device == x.device and out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, ENGINE(x, name, None, seed=0))
    assert torch.equal(ENGINE(x, "canny_edges", None, 0).cpu(), ENGINE(digits, "canny_edges", None, 0))


def test_float32_path_of_mps_runs_on_cpu(digits):
    """The engine's one device-specific choice: float32 instead of float64 for geometry, line
    profiles and edge detection on Apple MPS (which has no float64). Forced on CPU
    (``device_paths='mps'``), every corruption runs and agrees with the float64 path: to float32
    rounding where the draws are the same, a few edge pixels for canny (gradients at the
    thresholds); motion_blur draws its angles in float32 there (another stream), so only its range
    is checked."""
    float32_path = MnistCCorruptionEngine(device_paths="mps")
    with pytest.raises(ValueError, match="device_paths"):
        MnistCCorruptionEngine(device_paths="no-such-device")
    for name in MNIST_C_CORRUPTIONS:
        a, b = ENGINE(digits, name, None, seed=0), float32_path(digits, name, None, seed=0)
        assert b.shape == a.shape and b.dtype == a.dtype and b.min() >= 0 and b.max() <= 1, name
        if name == "motion_blur":
            continue
        diff = (a - b).abs()
        if name == "canny_edges":
            assert float((diff > 0).float().mean()) < 0.01, name
        else:
            assert float(diff.max()) < 1e-4, (name, float(diff.max()))
