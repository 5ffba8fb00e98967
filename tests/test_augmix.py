"""AugMix (Hendrycks et al. 2020): the Jensen-Shannon term, the augmentation chains and the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustexp.data import augmix_ops
from robustexp.data.augmix_ops import OPERATION_FUNCTIONS, OPERATIONS, AugMix
from robustexp.errors import ConfigError
from robustexp.losses import jensen_shannon
from robustexp.methods.augmix import AugMixTraining

SPEC_OPERATIONS = {"autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
                   "translate_x", "translate_y"}


def test_jsd_is_zero_for_identical_distributions():
    log_p = F.log_softmax(torch.randn(5, 7), dim=1)
    assert torch.allclose(jensen_shannon([log_p, log_p, log_p]), torch.zeros(5), atol=1e-7)


def test_jsd_equals_a_hand_computation():
    p, q, z = [0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]
    m = [(a + b + c) / 3 for a, b, c in zip(p, q, z)]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    expected = (kl(p, m) + kl(q, m) + kl(z, m)) / 3
    got = jensen_shannon([torch.tensor([d]).log() for d in (p, q, z)])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # symmetric in its arguments, and at most log(3) (for three distributions with disjoint support)
    assert jensen_shannon([torch.tensor([d]).log() for d in (z, p, q)]).item() == pytest.approx(expected, rel=1e-6)
    disjoint = torch.eye(3).clamp_min(1e-30).log()
    assert jensen_shannon([disjoint[i:i + 1] for i in range(3)]).item() == pytest.approx(math.log(3), rel=1e-5)


def test_operations_are_those_of_the_spec():
    assert set(OPERATIONS) == SPEC_OPERATIONS == set(OPERATION_FUNCTIONS)


@pytest.mark.parametrize("shape", [(16, 1, 28, 28), (16, 3, 32, 24)])
def test_every_operation_and_augmix_stay_in_the_unit_box(shape):
    torch.manual_seed(0)
    images = torch.rand(shape)
    images[0] = 0.0
    images[1] = 1.0
    for name, op in OPERATION_FUNCTIONS.items():
        out = op(images, torch.full((shape[0],), 3.0))
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1, name
    mixed = AugMix()(images)
    assert mixed.shape == images.shape and mixed.min() >= 0 and mixed.max() <= 1
    assert not torch.allclose(mixed, images)


def test_augmix_is_deterministic_under_a_seed():
    images = torch.rand(12, 3, 20, 20)
    torch.manual_seed(5)
    a = AugMix()(images)
    torch.manual_seed(5)
    b = AugMix()(images)
    torch.manual_seed(6)
    c = AugMix()(images)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_augmix_uses_only_the_allowed_operations(monkeypatch):
    calls = []
    for name, op in list(OPERATION_FUNCTIONS.items()):
        def record(images, levels, _name=name, _op=op):
            calls.append(_name)
            assert levels.min() >= 0.1 and levels.max() <= 3.0   # levels ~ U(0.1, severity)
            return _op(images, levels)
        monkeypatch.setitem(augmix_ops.OPERATION_FUNCTIONS, name, record)
    torch.manual_seed(0)
    AugMix(severity=3)(torch.rand(64, 1, 16, 16))
    assert set(calls) == SPEC_OPERATIONS            # every one drawn on a batch of 64 x 3 chains
    calls.clear()
    AugMix(operations=["rotate", "solarize"])(torch.rand(64, 1, 16, 16))
    assert set(calls) == {"rotate", "solarize"}


def test_chain_depth_and_mixing_weights():
    """depth=1 with a single, known operation: the chain is that operation; the output is the
    convex combination (1 - m) x + m * op(x) with m in [0, 1] (all chains are equal here)."""
    torch.manual_seed(1)
    images = torch.rand(32, 1, 8, 8) * 0.5   # solarize at level <= 3 inverts pixels >= 180/255 only: none here
    mixed = AugMix(operations=["autocontrast"], depth=1)(images)
    stretched = OPERATION_FUNCTIONS["autocontrast"](images, torch.ones(32))
    # per image: mixed = images + m (stretched - images) for one m in [0, 1]
    diff, step = (mixed - images).flatten(1), (stretched - images).flatten(1)
    m = (diff * step).sum(1) / (step * step).sum(1)
    assert torch.allclose(diff, m.view(-1, 1) * step, atol=1e-5)
    assert m.min() >= 0 and m.max() <= 1 and m.std() > 0.1    # Beta(1, 1) skip weights differ per image


def test_operation_hand_cases():
    x = torch.tensor([[[[0.0, 100 / 255, 200 / 255, 1.0]]]])
    # posterize at level 3: keep 4 - int(1.2) = 3 bits: 100 -> 96, 200 -> 192, 255 -> 224
    assert torch.allclose(OPERATION_FUNCTIONS["posterize"](x, torch.tensor([3.0])) * 255,
                          torch.tensor([0.0, 96, 192, 224]).view(1, 1, 1, 4), atol=1e-4)
    # solarize at level 3: threshold 256 - int(76.8) = 180: 200 and 255 are inverted
    assert torch.allclose(OPERATION_FUNCTIONS["solarize"](x, torch.tensor([3.0])) * 255,
                          torch.tensor([0.0, 100, 55, 0]).view(1, 1, 1, 4), atol=1e-4)
    # translate by int(level * 30 / 3 / 10) = 2 pixels (sign random): an exact shift with black fill
    image = torch.zeros(1, 1, 30, 30)
    image[0, 0, 10:20, 10:20] = 1.0
    moved = OPERATION_FUNCTIONS["translate_x"](image, torch.tensor([2.5]))
    assert torch.allclose(moved, image.roll(2, dims=3), atol=1e-5) or \
        torch.allclose(moved, image.roll(-2, dims=3), atol=1e-5)
    # rotation below level 1/3 rounds to 0 degrees: the identity
    assert torch.allclose(OPERATION_FUNCTIONS["rotate"](image, torch.tensor([0.3])), image, atol=1e-5)


def test_training_loss_is_clean_cross_entropy_plus_lambda_jsd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    images, labels = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    method = AugMixTraining(lambda_jsd=12.0)
    torch.manual_seed(3)
    loss, logs = method.training_step(model, images, labels)
    torch.manual_seed(3)
    aug1, aug2 = method.augmix(images), method.augmix(images)
    with torch.no_grad():
        clean = model(images)
        jsd = jensen_shannon([F.log_softmax(model(v), dim=1) for v in (images, aug1, aug2)]).mean()
    expected = F.cross_entropy(clean, labels) + 12.0 * jsd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["jsd"] == pytest.approx(jsd.item(), rel=1e-5) and logs["jsd"] > 0


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="method.operations"):
        AugMixTraining(operations=["contrast"])
    with pytest.raises(ConfigError, match="method.severity"):
        AugMixTraining(severity=11)
    with pytest.raises(ConfigError, match="method.depth"):
        AugMixTraining(depth=0)
    with pytest.raises(ConfigError, match="method.lambda_jsd"):
        AugMixTraining(lambda_jsd=-1)
