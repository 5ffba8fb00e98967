"""The Nandy et al. 2021 recipes (conf/experiment/nandy_*.yaml) as the paper has them: the std mixing
of Sec. 2 in every adaptation variant, Table 1's sigma grid, Table 3 (ImageNet-C, AlexNet-normalized,
without and with adaptive BN) and Fig. 2 (loss gradients, adapt then freeze)."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustexp.adaptation import BatchNormAdaptation
from robustexp.adaptation.sweep import adaptation_variants
from robustexp.main import CONFIG_DIR
from tests.conftest import compose_config

NANDY = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("nandy_*.yaml"))
USER_PATHS = ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]


def _compose(name: str):
    return compose_config([f"+experiment={name}", *([] if name.endswith("_small") else USER_PATHS)], toy=False)


def test_the_nandy_recipes_include_table3_and_fig2_in_both_sizes():
    assert {"nandy_table3", "nandy_table3_small", "nandy_fig2", "nandy_fig2_small"} <= set(NANDY)


@pytest.mark.parametrize("name", NANDY)
def test_every_nandy_adaptation_variant_mixes_standard_deviations(name):
    """Sec. 2: s_bar = rho s_t + (1 - rho) s_T, on the biased test-batch variance."""
    variants, _ = adaptation_variants(_compose(name).adaptation)
    adapted = {label: v for label, v in variants.items() if v.adapts}
    assert adapted, f"{name} has no adaptation variant"
    for label, variant in adapted.items():
        assert isinstance(variant, BatchNormAdaptation) and variant.mode == "momentum", (name, label)
        assert (variant.mix, variant.test_variance) == ("std", "biased"), (name, label)


def test_the_momentum_adaptation_defaults_to_nandys_std_mixing():
    variants, _ = adaptation_variants(compose_config(["+adaptation=momentum"], toy=False).adaptation)
    assert variants["momentum"].mix == "std"
    assert "mixed on the std" in variants["momentum"].describe()


@pytest.mark.parametrize("name", ["nandy_table1", "nandy_table1_small"])
def test_table1_evaluates_the_papers_sigma_grid(name):
    """Table 1's columns: sigma = 0, 0.25, 0.5, 0.75, with and without adaptive BN (rho = 1, n = 512)."""
    cfg = _compose(name)
    assert list(cfg.eval.evaluators.gaussian_noise.sigmas) == [0.0, 0.25, 0.5, 0.75]
    assert cfg.eval.evaluators.gaussian_noise.repetitions == 5
    variants, _ = adaptation_variants(cfg.adaptation)
    assert list(variants) == ["none", "momentum"]
    assert (variants["momentum"].momentum, variants["momentum"].batch_size) == (1.0, 512)


@pytest.mark.parametrize("name", ["nandy_table4", "nandy_table4_small", "nandy_table5", "nandy_table5_small"])
def test_tables_4_and_5_evaluate_sigma_half_only(name):
    assert list(_compose(name).eval.evaluators.gaussian_noise.sigmas) == [0.5]


def test_table3_full_recipe_is_imagenet_c_with_alexnet_normalization():
    cfg = _compose("nandy_table3")
    assert cfg.dataset.name == "imagenet" and cfg.model.arch == "resnet50" and cfg.trainer.epochs == 0
    corruptions = cfg.eval.evaluators.corruptions
    assert corruptions.source.format == "imagenet_c" and corruptions.corruptions == "common"
    assert corruptions.severities is None and corruptions.ce_baseline == "alexnet"
    assert cfg.eval.evaluators.eps_star is None and "clean" in cfg.eval.evaluators
    variants, _ = adaptation_variants(cfg.adaptation)
    assert list(variants) == ["none", "momentum"]   # Table 3: w/o and with adaptive BN
    assert (variants["momentum"].momentum, variants["momentum"].batch_size) == (1.0, 512)


def test_table3_small_recipe_sweeps_baseline_and_adversarial_training_on_generated_corruptions():
    cfg = compose_config(["+experiment=nandy_table3_small"], toy=False, return_hydra_config=True)
    assert cfg.hydra.sweeper.params["+method"] == "standard,pgd_at"
    corruptions = cfg.eval.evaluators.corruptions
    assert corruptions.corruptions == "common" and corruptions.ce_baseline is None
    assert cfg.corruptions._target_.endswith("GeneratedCorruptions") or "engine" in cfg.corruptions
    assert cfg.eval.evaluators.eps_star is None
    assert list(adaptation_variants(cfg.adaptation)[0]) == ["none", "momentum"]


@pytest.mark.parametrize("name", ["nandy_fig2", "nandy_fig2_small"])
def test_fig2_takes_loss_gradients_at_the_table1_sigmas_with_adapt_then_freeze(name):
    cfg = _compose(name)
    node = cfg.eval.evaluators.loss_gradient
    assert node._target_ == "robustexp.evaluation.loss_gradient.LossGradientEvaluator"
    assert list(node.sigmas) == [0.0, 0.25, 0.5, 0.75]
    variants, _ = adaptation_variants(cfg.adaptation)
    # one adapted variant: its evaluation takes the gradients of the unadapted and of the adapted model
    assert list(variants) == ["momentum"] and variants["momentum"].momentum == 1.0
