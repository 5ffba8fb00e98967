"""PGD: iterates stay in the eps ball and in [0, 1], raise the loss, and leave the model's gradients alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustexp.attacks import pgd, project, random_start
from robustexp.errors import ConfigError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_ball_and_box_and_raises_loss(norm, eps):
    model, (x, y) = _model(), _data()
    x[:, :, :2] = 0.0  # saturated pixels: the box constraint binds
    x[:, :, -2:] = 1.0

    def loss_fn(images, labels):
        return F.cross_entropy(model(images), labels, reduction="none")

    adv = pgd(loss_fn, x, y, norm=norm, eps=eps, step_size=eps / 4, steps=10, restarts=2,
              generator=torch.Generator().manual_seed(0))
    delta = adv - x
    assert adv.min() >= 0 and adv.max() <= 1
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-5
    with torch.no_grad():
        assert (loss_fn(adv, y) >= loss_fn(x, y) - 1e-6).all()
        assert loss_fn(adv, y).mean() > loss_fn(x, y).mean() + 0.05
    assert all(p.grad is None for p in model.parameters())


def test_linf_pgd_on_linear_model_reaches_the_corner():
    """For a linear loss w.x the L-inf maximizer is x + eps sign(w), clipped to the box."""
    w = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x = torch.full((1, 3, 4, 4), 0.5)
    adv = pgd(lambda images, labels: (images * w).flatten(1).sum(1), x, torch.zeros(1), norm="linf", eps=0.1,
              step_size=0.05, steps=5, random_init=False)
    torch.testing.assert_close(adv, x + 0.1 * w.sign())


def test_l2_projection_and_random_start():
    x = torch.full((64, 1, 5, 5), 0.5)
    delta = torch.randn(64, 1, 5, 5)
    projected = project(x, delta, "l2", 0.3)
    assert torch.allclose(projected.flatten(1).norm(dim=1), torch.full((64,), 0.3), atol=1e-5)
    start = random_start(x, "l2", 0.3, torch.Generator().manual_seed(0))
    norms = start.flatten(1).norm(dim=1)
    assert norms.max() <= 0.3 + 1e-6 and norms.min() > 0.1  # uniform in a 25-d ball: radii concentrate near eps


def test_bad_norm_is_named():
    with pytest.raises(ConfigError, match="norm='l1'"):
        pgd(lambda a, b: a.sum((1, 2, 3)), torch.zeros(1, 1, 2, 2), torch.zeros(1), norm="l1", eps=0.1,
            step_size=0.1, steps=1)


def test_gaussian_start_is_small_and_inside_the_ball():
    """init_std: the TRADES start x + 0.001 N(0, I), projected into the ball (0 steps: the start itself)."""
    x = torch.full((256, 3, 4, 4), 0.5)
    adv = pgd(lambda a, b: a.sum((1, 2, 3)), x, torch.zeros(256), norm="linf", eps=8 / 255, step_size=0.0,
              steps=0, init_std=0.001, generator=torch.Generator().manual_seed(0))
    delta = adv - x
    assert delta.abs().max() <= 8 / 255 and 0.0009 < delta.std().item() < 0.0011
