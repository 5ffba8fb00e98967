"""Clipping-aware L2 rescaling and the eps* line search (Rusak et al. 2020, footnote 3 and eq. 4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustexp.evaluation.eps_star import line_search
from robustexp.main import run
from robustexp.perturbations import clipping_aware_scale, rescale_to_l2
from tests.conftest import compose_config, trained_like_cnn


@pytest.mark.parametrize("eps", [0.05, 0.5, 2.0, 5.0])
def test_rescaled_perturbation_has_norm_eps_also_with_saturated_pixels(eps):
    torch.manual_seed(0)
    x = torch.rand(32, 3, 8, 8)
    x[:, :, :3] = 1.0   # saturated bright rows
    x[:, :, 3:5] = 0.0  # saturated dark rows
    d = torch.randn_like(x)
    out = rescale_to_l2(x, d, eps)
    norms = (out - x).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, eps), atol=1e-4)
    assert 0 <= out.min() and out.max() <= 1


def test_scale_hand_case_and_unreachable_sizes():
    # one pixel at 0.9 moving up (room 0.1), one at 0.5 moving down (room 0.5), d = (1, -1)
    x, d = torch.tensor([[0.9, 0.5]]), torch.tensor([[1.0, -1.0]])
    # eps^2 = 0.08 = 2 eta^2 -> eta = 0.2 > 0.1: the first pixel saturates, S = 0.01 + eta^2 -> eta = sqrt(0.07)
    assert clipping_aware_scale(x, d, math.sqrt(0.08)).item() == pytest.approx(math.sqrt(0.07), rel=1e-6)
    assert clipping_aware_scale(x, d, 0.1).item() == pytest.approx(0.1 / math.sqrt(2), rel=1e-6)  # no saturation
    # beyond full saturation (max norm sqrt(0.01 + 0.25)) the largest reachable size is returned
    out = rescale_to_l2(x, d, 10.0)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0]]))


class Linear2(nn.Module):
    """Class 1 iff w.x + b > 0."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], dim=1)


def test_line_search_finds_the_boundary_of_a_linear_model():
    torch.manual_seed(1)
    n = 3 * 8 * 8
    x = torch.full((6, 3, 8, 8), 0.5)
    d = torch.randn(6, 3, 8, 8) * 0.02
    w = torch.randn(n)
    d = d * torch.sign(d.flatten(1) @ w).view(-1, 1, 1, 1)  # moving along d increases w.x
    boundary = torch.tensor([0.3, 0.6, 0.9, 1.2, 1.5, 1.8])    # eps* we place the boundary at
    eta = boundary / d.flatten(1).norm(dim=1)
    # at eta the score crosses 0: b = -(w.x + eta w.d), per image -> evaluate one image at a time
    for i in range(6):
        b = -(x[i].flatten() @ w + eta[i] * (d[i].flatten() @ w))
        assert (eta[i] * d[i]).abs().max() < 0.5  # no clipping on the way: the exact boundary is eta ||d||
        found = line_search(Linear2(w, b), x[i:i + 1], torch.tensor([0]), d[i:i + 1], grid_points=20,
                            bisection_steps=16)
        assert found.item() == pytest.approx(boundary[i].item(), abs=1e-3)
        # the upper end of the final bracket, where the model is broken (up to the float32 score at the crossing)
        assert found.item() >= boundary[i].item() - 1e-4


def test_unbreakable_and_already_broken_images():
    w = torch.zeros(12)
    w[0] = 1.0
    x = torch.full((2, 3, 2, 2), 0.5)
    d = torch.zeros_like(x)
    d[:, 1] = 1.0  # moves only pixels the model ignores
    model = Linear2(w, torch.tensor(-1.0))  # class 0 everywhere in [0, 1]
    result = line_search(model, x, torch.tensor([0, 1]), d)
    assert math.isinf(result[0].item())   # never misclassified
    assert result[1].item() == 0.0        # label 1: already misclassified
    changed = line_search(model, x, torch.tensor([0, 1]), d, criterion="changed")
    assert math.isinf(changed[1].item())  # the prediction never changes


def test_eps_star_evaluator_on_the_embedded_data(tmp_path):
    cfg = compose_config(["eval=eps_star", "eval.evaluators.eps_star.max_images=40",
                          "eval.evaluators.eps_star.grid_points=10", "eval.evaluators.eps_star.bisection_steps=4",
                          "eval.evaluators.eps_star.adversarial_steps=30",
                          "eval.evaluators.eps_star.adversarial_eps_l2=null",   # the size rule tested below
                          "eval.evaluators.eps_star.adversarial_generators=2"])
    metrics = run(cfg, tmp_path)
    directions = metrics["eps_star"]["directions"]
    assert set(directions) == {"gaussian", "uniform", "adversarial"} and directions["gaussian"]["n"] == 40
    assert 0 < directions["gaussian"]["eps_star"] < 30  # L2 over 28x28 pixels in [0, 1]
    # the generator was trained at a size at which Gaussian noise breaks this model: at least its
    # Gaussian eps* (the median over images, including those broken without noise)
    size = metrics["eps_star"]["adversarial_generator_eps_l2"]
    assert directions["gaussian"]["eps_star"] <= size <= directions["gaussian"]["mean_finite"] * 3
    assert "eps_star_adversarial" in metrics["summary"] and "eps_star_adversarial_std" in metrics["summary"]
    assert len(directions["adversarial"]["eps_star_per_generator"]) == 2


def test_adversarial_generator_training_leaves_the_classifier_alone():
    from robustexp.data.base import TensorImageDataset
    from robustexp.evaluation.eps_star import train_adversarial_generator

    model = trained_like_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    data = TensorImageDataset(torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), torch.arange(64) % 10)
    small = TensorImageDataset(data.images[:5], data.labels[:5])  # fewer images than a batch: still trains
    train_adversarial_generator(model, small, torch.device("cpu"), eps_l2=2.0, steps=3, batch_size=16)
    generator = train_adversarial_generator(model, data, torch.device("cpu"), eps_l2=2.0, steps=60, batch_size=16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # eval mode, no update
    assert [p.requires_grad for p in model.parameters()] == flags
    z = generator.sample_input((2, 1, 28, 28), "cpu")
    assert not torch.allclose(generator(z), z, atol=1e-4)  # trained away from the identity
    # what training optimizes: at its L2 size its noise hurts more than Gaussian noise of that size
    images, labels = data.images.float() / 255, data.labels
    torch.manual_seed(5)
    with torch.no_grad():
        def learned_noise():
            return generator(generator.sample_input(images.shape, "cpu"))

        learned = sum(F.cross_entropy(model(rescale_to_l2(images, learned_noise(), 2.0)), labels) for _ in range(5)) / 5
        gaussian = sum(F.cross_entropy(model(rescale_to_l2(images, torch.randn_like(images), 2.0)), labels)
                       for _ in range(5)) / 5
    assert learned > gaussian


def _toy_splits(n_train=64, n_test=20):
    """Random dark images (pixels in [0, 200/255]), all of class 0 for :func:`_brightness_model`."""
    from types import SimpleNamespace

    from robustexp.data.base import TensorImageDataset

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 201, (n_train + n_test, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.zeros(n_train + n_test, dtype=torch.long)
    return SimpleNamespace(train=TensorImageDataset(images[:n_train], labels[:n_train]),
                           test=TensorImageDataset(images[n_train:], labels[n_train:]))


def _brightness_model():
    """Class 1 iff the pixel sum exceeds 330 (the toy images sum to ~306 +- 7): noise that brightens
    breaks it, so a learned generator finds finite eps* that depend on its seed."""
    return Linear2(torch.ones(28 * 28), torch.tensor(-330.0))


def test_adversarial_eps_star_is_the_mean_and_std_over_generators_of_different_seeds(tmp_path):
    """Rusak et al. Sec. 4 / Table 2: four noise generators with different random seeds, eps* along
    each one's noise (eq. 4), reported as mean and standard deviation over the generators."""
    import numpy as np

    from robustexp.data.batches import evaluation_order
    from robustexp.evaluation.base import EvalContext
    from robustexp.evaluation.eps_star import (
        EpsStarEvaluator,
        noise_direction,
        train_adversarial_generator,
    )
    from robustexp.utils import derive_seed

    model, data = _brightness_model(), _toy_splits()
    ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False)
    options = {"directions": ["adversarial"], "adversarial_eps_l2": 2.0, "adversarial_steps": 4,
               "adversarial_lr": 0.05, "grid_points": 5, "bisection_steps": 4, "batch_size": 10, "seed": 0}
    evaluator = EpsStarEvaluator(adversarial_generators=3, **options)
    results = evaluator.evaluate(model, data, ctx)
    adversarial = results["directions"]["adversarial"]
    per_generator = adversarial["eps_star_per_generator"]
    assert adversarial["generators"] == 3 and len(set(per_generator)) == 3  # different seeds, different noise
    assert all(0 < v < math.inf for v in per_generator)
    assert adversarial["eps_star"] == pytest.approx(np.mean(per_generator))
    assert adversarial["eps_star_std"] == pytest.approx(np.std(per_generator)) and adversarial["eps_star_std"] > 0
    assert adversarial["n"] == 20 and results["adversarial_generator_eps_l2"] == 2.0
    # generator k's eps* is eq. (4) along its own noise: recompute generator 1's by hand
    generator = train_adversarial_generator(model, data.train, torch.device("cpu"), 2.0, 4, lr=0.05,
                                            seed=derive_seed(0, "adversarial generator", 1))
    order = evaluation_order(20)
    images = torch.stack([data.test[i][0] for i in order.tolist()])
    labels = torch.zeros(20, dtype=torch.long)
    sizes = torch.cat([line_search(model, images[i:i + 10], labels[i:i + 10], noise_direction(
        "adversarial", images[i:i + 10], torch.Generator().manual_seed(derive_seed(0, "adversarial", 1, i // 10)),
        generator), 5, 4) for i in (0, 10)])
    assert per_generator[1] == pytest.approx(float(np.median(sizes.numpy())))
    # the first generator does not depend on how many are trained
    single = EpsStarEvaluator(adversarial_generators=1, **options).evaluate(model, data, ctx)
    assert single["directions"]["adversarial"]["eps_star_per_generator"] == [per_generator[0]]
    assert single["directions"]["adversarial"]["eps_star_std"] == 0.0
    headline = evaluator.headline(results)
    assert headline["eps_star_adversarial"] == adversarial["eps_star"]
    assert headline["eps_star_adversarial_std"] == adversarial["eps_star_std"]
    assert "± " in evaluator.table(results) and "3 generators" in evaluator.table(results)


def test_adversarial_generators_are_seeded_and_leave_the_global_rng_alone():
    from robustexp.evaluation.eps_star import train_adversarial_generator

    model, data = _brightness_model(), _toy_splits()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = train_adversarial_generator(model, data.train, torch.device("cpu"), 2.0, 3, batch_size=16, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # every rank of a multi-process run trains the same one
    b = train_adversarial_generator(model, data.train, torch.device("cpu"), 2.0, 3, batch_size=16, seed=1)
    c = train_adversarial_generator(model, data.train, torch.device("cpu"), 2.0, 3, batch_size=16, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_bad_eps_star_generator_options():
    from robustexp.errors import ConfigError
    from robustexp.evaluation.eps_star import EpsStarEvaluator

    with pytest.raises(ConfigError, match="adversarial_generators=0; expected an integer >= 1"):
        EpsStarEvaluator(adversarial_generators=0)
    with pytest.raises(ConfigError, match="adversarial_eps_l2=-1"):
        EpsStarEvaluator(adversarial_eps_l2=-1)


def test_learned_noise_generators_are_trained_at_ant_radius_for_every_model():
    """Rusak et al. Sec. 3.3: the evaluation generator is a new one trained as ANT trains its generators,
    at ANT's sphere radius: the same size for every model of a comparison (Table 2), the digits' 9.5
    by default, the paper's 135 in the ImageNet recipe; four of them (Sec. 4)."""
    from robustexp.config import instantiate_component

    paths = ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]
    for method in ("standard", "gnt", "ant"):
        for eval_name in ("default", "eps_star"):
            node = compose_config([f"+method={method}", f"eval={eval_name}"], toy=False).eval.evaluators.eps_star
            assert node.adversarial_eps_l2 == compose_config(["+method=ant"], toy=False).method.eps_l2 == 9.5
            assert node.adversarial_generators == 4
        node = compose_config(["+experiment=rusak_table3", f"+method={method}", *paths], toy=False).eval.evaluators
        assert instantiate_component(node.eps_star).adversarial_eps_l2 == 135.0
        assert node.eps_star.adversarial_generators == 4


def _line_search_every_image(model, x, y, direction, grid_points, bisection_steps, criterion="misclassified"):
    """The line search as it was before issue 21: every image is evaluated at every size, also those
    already settled. The search must give exactly these sizes (it only skips settled images)."""
    model.eval()
    with torch.no_grad():
        clean_prediction = model(x).argmax(1)
        reference = y if criterion == "misclassified" else clean_prediction

        def broken(eps):
            eta = clipping_aware_scale(x, direction, eps)
            return model((x + eta.view(-1, 1, 1, 1) * direction).clamp(0, 1)).argmax(1) != reference

        from robustexp.perturbations import clipped_l2_norm

        big = torch.full((len(x),), 1e9, dtype=torch.float64)
        eps_max = clipped_l2_norm(x.double(), direction.double(), clipping_aware_scale(x, direction, big).double())
        result = torch.full((len(x),), math.inf, dtype=torch.float64)
        result[clean_prediction != reference] = 0.0
        low, high = torch.zeros_like(eps_max), torch.full_like(eps_max, math.inf)
        pending = result.isinf()
        for i in range(1, grid_points + 1):
            eps = eps_max * i / grid_points
            hit = pending & broken(eps)
            high[hit] = eps[hit]
            low[pending & ~hit] = eps[pending & ~hit]
            pending &= ~hit
        found = result.isinf() & high.isfinite()
        for _ in range(bisection_steps):
            mid = torch.where(found, (low + high) / 2, low)
            hit = found & broken(mid)
            high, low = torch.where(hit, mid, high), torch.where(found & ~hit, mid, low)
        result[found] = high[found]
        return result


class _CountingModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


class _NearestMean(nn.Module):
    """A digit classifier that noise breaks at finite sizes: the class whose mean training image is nearest."""

    def __init__(self, images, labels):
        super().__init__()
        self.means = torch.stack([images[labels == c].mean(0).flatten() for c in range(10)])

    def forward(self, x):
        return -((x.flatten(1)[:, None] - self.means[None]) ** 2).sum(-1)  # per image (cdist's kernel depends on B)


@pytest.mark.parametrize("criterion", ["misclassified", "changed"])
def test_line_search_skips_settled_images_and_finds_the_same_sizes(criterion):
    """Issue 21: the search evaluates only the images still in the grid scan (or still bisected),
    with bit-identical sizes to evaluating every image at every step, and far fewer forward passes."""
    from robustexp.data.embedded import mnist5k

    data = mnist5k(n_train=300, n_test=60)
    x = torch.stack([data.test[i][0] for i in range(60)])
    y = torch.stack([data.test[i][1] for i in range(60)])
    train_x = torch.stack([data.train[i][0] for i in range(300)])
    train_y = torch.stack([data.train[i][1] for i in range(300)])
    g = torch.Generator().manual_seed(0)
    for classifier in (_NearestMean(train_x, train_y), trained_like_cnn()):  # the CNN: conv kernels, batch sizes
        model = _CountingModel(classifier)
        for direction in (torch.randn(x.shape, generator=g), torch.rand(x.shape, generator=g) * 2 - 1):
            model.images = 0
            found = line_search(model, x, y, direction, grid_points=20, bisection_steps=8, criterion=criterion)
            searched = model.images
            expected = _line_search_every_image(classifier, x, y, direction, 20, 8, criterion)
            assert torch.equal(found, expected)
            if isinstance(classifier, _NearestMean):  # most images settle early in the scan
                assert found.isfinite().float().mean() > 0.5 and searched < 0.8 * 60 * (1 + 20 + 8)
        # a single image left to search is evaluated in a batch of two (a batch of one may take another kernel)
        one = line_search(classifier, x[:1], y[:1], direction[:1], grid_points=20, bisection_steps=8,
                          criterion=criterion)
        assert torch.equal(one, expected[:1])
