"""Shared fixtures: compose the real configs (conf/) at toy size."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from robustexp.main import CONFIG_DIR  # also registers the ${run_id:} resolver
from robustexp.models.small_cnn import SmallCNN

os.environ.setdefault("WANDB_SILENT", "true")

TOY = [
    "logger.mode=disabled",
    "runtime.progress=false",
    "dataset.n_train=500",
    "dataset.n_test=100",
    "trainer.epochs=2",
    "trainer.batch_size=25",
    "eval.evaluators.corruptions.corruptions=[gaussian_noise,contrast]",
    "eval.evaluators.corruptions.severities=[1,3]",
    "eval.evaluators.eps_star.max_images=20",
    "eval.evaluators.eps_star.grid_points=5",
    "eval.evaluators.eps_star.bisection_steps=2",
    "eval.evaluators.eps_star.adversarial_steps=3",

]


def toy_overrides(overrides=()) -> list[str]:
    """TOY, less the engine setting when the overrides switch the corruption source."""
    switched = any(o.startswith("corruptions=") for o in overrides)
    return [o for o in TOY if not (switched and o.startswith("corruptions."))]


def compose_config(overrides=(), toy: bool = True, return_hydra_config: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*(toy_overrides(overrides) if toy else []), *overrides],
                       return_hydra_config=return_hydra_config)


@pytest.fixture
def toy_config():
    return compose_config


def trained_like_cnn(seed=0):
    """A small SmallCNN whose BN running statistics differ from any test batch (as after training)."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10, in_channels=1, width=8)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.rand(32, 1, 28, 28) * 0.5)
    return model.eval()


def subset_b_alone_and_after_a(model, ctx, batch_size):
    """Evaluate subset B, then A, then B again under ``ctx``'s adaptation: (B alone, B after A).
    Equal results mean nothing leaked from one subset to the next."""
    from robustexp.evaluation.base import evaluate_subset

    labels = torch.arange(32) % 10
    subset_a, subset_b = torch.rand(32, 1, 28, 28) + 1.0, torch.rand(32, 1, 28, 28) * 0.1

    def make(images):
        return lambda n: ((images[i:i + n], labels[i:i + n]) for i in range(0, 32, n))

    b_alone = evaluate_subset(model, make(subset_b), ctx, batch_size=batch_size)
    evaluate_subset(model, make(subset_a), ctx, batch_size=batch_size)
    return b_alone, evaluate_subset(model, make(subset_b), ctx, batch_size=batch_size)
