"""Recipe pins: every full paper recipe (conf/experiment/<name>.yaml without ``_small``) composed as a user
runs it, compared key by key with a table of what the paper states.

Each table row is (dotted config key, expected value, source). The source is the paper's section / table /
equation ("Shu et al. Sec. 5.1"), a constant of /work/shared/SPEC.md ("SPEC: ..."), or "ours: <reason>" for a
value the paper does not state (the row then pins our choice, so that changing it is a visible decision).
docs/recipes.md shows the same tables for readers.

Sweep recipes get one table for the recipe and one per job of ``hydra.sweeper.params`` (composed with that job's
override, e.g. ``+method=ant``), so a failure names the recipe and the job. A full recipe found in
conf/experiment/ without a table fails ("no pin table for X"), and so does a table whose recipe file is missing.

Keys starting with ``@`` are derived from the composed config (see ``DERIVED``): the total batch over the GPUs of
a job, the corruption names a named set resolves to, and the settings of every adaptation variant the run
instantiates (so a pin holds however a recipe lays out its variants and grids).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from robustexp.adaptation.sweep import adaptation_variants
from robustexp.config import instantiate_component
from robustexp.data.corruptions.names import ALL_CORRUPTIONS, HOLDOUT_CORRUPTIONS, TEST_CORRUPTIONS, resolve_corruptions
from robustexp.main import CONFIG_DIR
from tests.conftest import compose_config

EXPERIMENT_DIR = Path(CONFIG_DIR) / "experiment"
FULL_EXPERIMENTS = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml") if not p.stem.endswith("_small"))
# what a full recipe needs from the user (data paths); a required checkpoint is pinned by model.require_checkpoint
USER_PATHS = ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]

EPS_8_255 = 8 / 255
EPS_4_255 = 4 / 255


# ---------------------------------------------------------------------------------------------- row types
class _Required:
    """The value must be supplied by the user (the config holds ``???``)."""

    def __repr__(self) -> str:
        return "??? (user-supplied)"


REQUIRED = _Required()
_ABSENT = object()
_NO_DEFAULT = object()


@dataclass(frozen=True)
class Contains:
    """The composed list contains all of these values (and may hold more)."""
    values: tuple

    def __repr__(self) -> str:
        return f"a list containing {list(self.values)}"


@dataclass(frozen=True)
class Target:
    """A ``_target_`` whose last dotted component is this class / function name (robust to re-exports)."""
    name: str

    def __repr__(self) -> str:
        return f"a _target_ ending in {self.name!r}"


@dataclass(frozen=True)
class Pin:
    key: str                   # dotted config key, or a derived key "@..." (see DERIVED)
    expected: Any              # float / int / bool / str / None / list / frozenset (order-free) / REQUIRED / ...
    source: str                # "<paper> Sec. X" | "SPEC: ..." | "ours: <reason>"
    default: Any = _NO_DEFAULT  # the value the code uses when the key is absent from the config


# ---------------------------------------------------------------------------------------------- derived keys
def _total_batch_size(cfg) -> int:
    """Images per optimizer step: trainer.batch_size is per process; a job runs
    hydra.launcher.tasks_per_node processes (one per GPU) on hydra.launcher.nodes nodes."""
    launcher = cfg.hydra.launcher
    return int(cfg.trainer.batch_size) * int(launcher.get("tasks_per_node", 1) or 1) * int(launcher.get("nodes", 1)
                                                                                          or 1)


def _sweep(param: str) -> Callable:
    def values(cfg) -> list[str] | None:
        params = cfg.hydra.sweeper.get("params")
        if not params or param not in params:
            return None
        return [v.strip() for v in str(params[param]).split(",")]
    values.__doc__ = f"the values of hydra.sweeper.params[{param!r}] (one job each)"
    return values


def _corruption_set(evaluator: str) -> Callable:
    def names(cfg) -> frozenset:
        spec = cfg.eval.evaluators[evaluator].corruptions
        spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
        return frozenset(resolve_corruptions(spec, "imagenet_c"))
    names.__doc__ = f"the corruption names eval.evaluators.{evaluator}.corruptions resolves to (a set or a list)"
    return names


def _adapted(cfg) -> list:
    """The BN adaptations of every variant the run evaluates (the unadapted model left out)."""
    variants, _ = adaptation_variants(cfg.get("adaptation"))
    return [v for v in variants.values() if v.adapts]


def _variant_attr(attr: str, mode: str | None = None, as_set: bool = True) -> Callable:
    def values(cfg):
        found = [getattr(v, attr) for v in _adapted(cfg) if mode is None or v.mode == mode]
        return frozenset(found) if as_set else sorted(set(found))
    values.__doc__ = f"{attr} of every adapted variant" + (f" in mode {mode}" if mode else "")
    return values


def _method_attr(path: str) -> Callable:
    def value(cfg):
        obj = instantiate_component(cfg.method, label="method")
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj
    value.__doc__ = f"the instantiated method's {path} (what a null option resolves to)"
    return value


DERIVED: dict[str, Callable] = {
    "@total_batch_size": _total_batch_size,
    "@sweep:+method": _sweep("+method"),
    "@corruption_set": _corruption_set("corruptions"),
    "@holdout_set": _corruption_set("holdout"),
    "@adapted.mode": _variant_attr("mode"),
    "@adapted.mix": _variant_attr("mix"),
    "@adapted.test_variance": _variant_attr("test_variance"),
    "@prior.N": _variant_attr("prior_strength", mode="prior", as_set=False),   # sorted distinct values
    "@prior.n": _variant_attr("batch_size", mode="prior", as_set=False),
    "@method.step_size": _method_attr("step_size"),
    "@method.advbn.eps": _method_attr("advbn.eps"),
}


# ---------------------------------------------------------------------------------------------- comparison
def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _number_matches(actual, expected) -> bool:
    return isinstance(actual, (int, float)) and not isinstance(actual, bool) \
        and math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-12)


def matches(actual, expected) -> bool:
    """Floats with a relative tolerance of 1e-6 (4/255 written as 0.01568627); bools only equal bools;
    frozensets compare order-free; Contains and Target as documented."""
    if isinstance(expected, bool):
        return isinstance(actual, bool) and actual == expected
    if isinstance(expected, (int, float)):
        return _number_matches(actual, expected)
    if expected is None:
        return actual is None
    if isinstance(expected, frozenset):
        return isinstance(actual, (set, frozenset, list, tuple)) and len(set(actual)) == len(actual) \
            and frozenset(actual) == expected
    if isinstance(expected, (list, tuple)):
        return isinstance(actual, (list, tuple)) and len(actual) == len(expected) \
            and all(matches(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, Contains):
        return isinstance(actual, (list, tuple)) and all(any(matches(a, e) for a in actual) for e in expected.values)
    if isinstance(expected, Target):
        return isinstance(actual, str) and actual.rsplit(".", 1)[-1] == expected.name
    return type(actual) is type(expected) and actual == expected


def _lookup(cfg, pin: Pin):
    if pin.key.startswith("@"):
        return DERIVED[pin.key](cfg)
    if pin.expected is REQUIRED:
        parent_key, _, leaf = pin.key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if parent is None or leaf not in list(parent.keys()):  # `in` is False for a `???` value itself
            return _ABSENT
        return REQUIRED if OmegaConf.is_missing(parent, leaf) else _plain(parent[leaf])
    value = OmegaConf.select(cfg, pin.key, default=_ABSENT)
    if value is _ABSENT and pin.default is not _NO_DEFAULT:
        return pin.default
    return _plain(value)


def check_pins(cfg, pins: list[Pin], label: str) -> list[str]:
    """One message per row whose composed value differs from the table, citing the row's source."""
    failures = []
    for pin in pins:
        try:
            actual = _lookup(cfg, pin)
        except Exception as exc:  # a derived key that cannot be computed (e.g. an unknown corruption set name)
            failures.append(f"{label}: {pin.key} could not be read ({type(exc).__name__}: {exc}); "
                            f"expected {pin.expected!r} [{pin.source}]")
            continue
        if actual is _ABSENT:
            failures.append(f"{label}: {pin.key} is not in the composed config; expected {pin.expected!r} "
                            f"[{pin.source}]")
        elif not (actual is REQUIRED if pin.expected is REQUIRED else matches(actual, pin.expected)):
            failures.append(f"{label}: {pin.key} = {actual!r}, expected {pin.expected!r} [{pin.source}]")
    return failures


# ---------------------------------------------------------------------------------------------- shared rows
def _imagenet_data(paper: str, section: str) -> list[Pin]:
    return [
        Pin("dataset.name", "imagenet", f"{paper} {section}: ImageNet (ILSVRC2012)"),
        Pin("dataset.resize", 256, f"{paper} {section}: resize to 256, center crop 224"),
        Pin("dataset.image_size", 224, f"{paper} {section}: resize to 256, center crop 224"),
    ]


def _imagenet_c(paper: str, section: str, corruption_set: frozenset = frozenset(TEST_CORRUPTIONS),
                set_source: str = "") -> list[Pin]:
    return [
        Pin("corruptions._target_", Target("OnDiskCorruptions"),
            f"{paper} {section}: the released ImageNet-C images (already 224x224, no resize or crop)"),
        Pin("@corruption_set", corruption_set, set_source or f"{paper} {section}: the 15 ImageNet-C test corruptions"),
        Pin("eval.evaluators.corruptions.severities", None, f"{paper} {section}: all 5 severities (null: all)"),
        Pin("eval.evaluators.corruptions.max_images", None, f"{paper} {section}: all 50,000 images per subset"),
        Pin("eval.evaluators.corruptions.ce_baseline", "alexnet", f"{paper} {section}: mCE normalized by AlexNet"),
        Pin("eval.evaluators.clean.max_images", None, f"{paper} {section}: the whole 50,000-image validation set"),
    ]


def _nandy_model() -> list[Pin]:
    return [
        Pin("model._target_", Target("torchvision_model"), "Nandy et al. Sec. 3: ResNet50 (torchvision layout)"),
        Pin("model.arch", "resnet50", "Nandy et al. Sec. 3 / App. B.1: ResNet50"),
        Pin("model.require_checkpoint", True, "Nandy et al. App. B.1: the adversarially trained Adv_inf (L-inf "
            "4/255) / Adv_2 (L2 3.0) weights of Rice et al. 2020, supplied by the user (model.checkpoint=...)"),
        Pin("model.weights", None, "Nandy et al. App. B.1: not the torchvision ImageNet weights"),
        Pin("trainer.epochs", 0, "Nandy et al. Sec. 1: adaptive BN at test time, no additional training"),
        *_imagenet_data("Nandy et al.", "App. B.1 (its '256x265' is read as 256)"),
    ]


def _nandy_momentum(rho_source: str, n: int | None, n_source: str, unadapted: bool, unadapted_source: str
                    ) -> list[Pin]:
    rows = [
        Pin("@adapted.mode", frozenset({"momentum"}), "Nandy et al. Sec. 2: mu = rho mu_t + (1 - rho) mu_T"),
        Pin("adaptation.rho", 1.0, rho_source),
        Pin("@adapted.mix", frozenset({"std"}), "Nandy et al. Sec. 2: s_bar = rho s_t + (1 - rho) s_T (mixes std)"),
        Pin("@adapted.test_variance", frozenset({"biased"}),
            "ours: the paper does not say which s_t; the biased batch variance BN normalizes with"),
        Pin("adaptation.evaluate_unadapted", unadapted, unadapted_source),
    ]
    if n is not None:
        rows.append(Pin("adaptation.n", n, n_source))
    return rows


def _gaussian_noise(sigmas: list[float], sigma_source: str, repetitions_source: str) -> list[Pin]:
    return [
        Pin("eval.evaluators.gaussian_noise.sigmas", sigmas, sigma_source),
        Pin("eval.evaluators.gaussian_noise.repetitions", 5, repetitions_source),
        Pin("eval.evaluators.gaussian_noise.max_images", None,
            "Nandy et al. Table 1 caption: the (whole) test set, reshuffled per run"),
        Pin("eval.evaluators.gaussian_noise.clip", False,
            "ours: the paper adds N(0, sigma^2 I) without clipping (as Cohen et al.'s smoothing noise)"),
    ]


def _torchvision_resnet50_v1(paper: str, where: str) -> list[Pin]:
    return [
        Pin("model._target_", Target("torchvision_model"), f"{paper} {where}: torchvision ResNet-50"),
        Pin("model.arch", "resnet50", f"{paper} {where}: ResNet-50"),
        Pin("model.weights", "IMAGENET1K_V1", f"{paper} {where}: the pretrained torchvision ResNet-50 (76.1 % top-1, "
            "i.e. the V1 weights)"),
    ]


def _augmix_options(paper: str) -> list[Pin]:
    return [
        Pin("method.width", 3, "SPEC: AugMix width 3"),
        Pin("method.depth", -1, "SPEC: AugMix depth 1-3 (-1: random in 1..3)"),
        Pin("method.alpha", 1.0, "SPEC: mixing weights ~ Dirichlet(1), skip weight ~ Beta(1, 1)"),
        Pin("method.severity", 3, f"ours: AugMix reference default; {paper} does not state it"),
        Pin("method.operations", None, "SPEC: the nine AugMix operations (null: all)"),
    ]


# ---------------------------------------------------------------------------------------------- the tables
PINS: dict[str, list[Pin]] = {}
JOB_PINS: dict[str, dict[str, list[Pin]]] = {}

# --- Rusak et al. 2020, Table 3 (ImageNet-C, ResNet-50 fine-tuned with each noise method) ---------------------------
PINS["rusak_table3"] = [
    *_torchvision_resnet50_v1("Rusak et al.", "Sec. 4 ('a classifier that was pretrained on ImageNet'; Table 3 "
                              "vanilla RN50)"),
    *_imagenet_data("Rusak et al.", "Sec. 3.3 (ImageNet validation set)"),
    Pin("dataset.augment", "crop_flip", "ours: standard ImageNet random-resized crop + flip (Appendix A not in "
        "our copy of the paper)"),
    Pin("trainer.epochs", 15, "ours: fine-tuning length (the paper's Appendix A is not in our copy)"),
    Pin("trainer.optimizer._target_", "torch.optim.SGD", "ours: (Appendix A not in our copy)"),
    Pin("trainer.optimizer.lr", 0.001, "ours: fine-tuning lr (Appendix A not in our copy)"),
    Pin("trainer.optimizer.momentum", 0.9, "ours"),
    Pin("trainer.optimizer.nesterov", True, "ours"),
    Pin("trainer.optimizer.weight_decay", 5e-4, "ours: trainer/standard.yaml default"),
    Pin("trainer.scheduler._target_", "torch.optim.lr_scheduler.OneCycleLR", "ours: one-cycle, per step"),
    Pin("trainer.scheduler.pct_start", 0.25, "ours"),
    Pin("trainer.batch_size", 64, "ours: per GPU"),
    Pin("@total_batch_size", 512, "ours: 64 per GPU x 8 GPUs"),
    Pin("hydra.launcher.gpus_per_node", 8, "ours: one node of 8 GPUs per job"),
    Pin("hydra.launcher.tasks_per_node", 8, "ours: one DDP process per GPU"),
    *_imagenet_c("Rusak et al.", "Sec. 3.3 (footnote 6: the JPEG-compressed ImageNet-C of Hendrycks et al.)"),
    Pin("eval.evaluators.eps_star.directions", ["gaussian", "uniform", "adversarial"],
        "Rusak et al. Sec. 3.3 / Table 2: eps* along Gaussian, uniform and learned adversarial noise"),
    Pin("eval.evaluators.eps_star.criterion", "misclassified", "Rusak et al. eq. (4): f(x + delta_min) != y"),
    Pin("eval.evaluators.eps_star.max_images", None, "Rusak et al. eq. (4): the median over the test set"),
    Pin("eval.evaluators.eps_star.adversarial_kernel", "1x1", "Rusak et al. Table 2: eps*_AN1x1"),
    Pin("eval.evaluators.eps_star.adversarial_generators", 4,
        "Rusak et al. Sec. 4: 'we train four noise generators with different random seeds' (mean +- std)"),
    Pin("eval.evaluators.eps_star.adversarial_eps_l2", 135.0,
        "Rusak et al. Sec. 3.3: 'a new noise generator' trained as in ANT (eq. 2), at ANT's ImageNet eps (SPEC: 135)"),
    Pin("@sweep:+method", ["standard", "gnt", "gnt_mult", "speckle", "ant", "ant3x3"],
        "Rusak et al. Table 3 rows: vanilla, GNT sigma 0.5, GNT mult, Speckle, ANT1x1, ANT3x3 (the +SIN rows need "
        "Stylized-ImageNet: +method=ant_sin)"),
]
_RUSAK_HALF_CLEAN = Pin("method.clean_fraction", 0.5, "Rusak et al. Sec. 3.1: 50 % of each batch stays clean")
_RUSAK_ANT = [
    Pin("method._target_", Target("AdversarialNoiseTraining"), "Rusak et al. Sec. 3.2: ANT"),
    Pin("method.eps_l2", 135.0, "SPEC: ImageNet eps = 135 (L2 over 3x224x224 in [0, 1])"),
    Pin("method.generator_lr", 1e-4, "SPEC: generator step Adam 1e-4"),
    _RUSAK_HALF_CLEAN,
    Pin("method.current_fraction", 0.3, "Rusak et al. Sec. 3.2: 30 % current generator (20 % replayed)"),
    Pin("method.replay_every", 50, "ours: 'saved at regular intervals' (Sec. 3.2), interval not stated"),
    Pin("method.replay_size", 50, "ours: replay memory size not stated"),
    Pin("method.restart_every", 1000, "ours: restart 'at regular intervals' (Sec. 3.2), interval not stated"),
    Pin("method.restart_steps", 100, "ours: steps of a new generator against the current classifier not stated"),
]
JOB_PINS["rusak_table3"] = {
    "+method=standard": [
        Pin("method._target_", Target("StandardTraining"), "Rusak et al. Table 3: vanilla RN50 (see docs/recipes.md: "
            "ours fine-tunes it with the same schedule)"),
        Pin("method.label_smoothing", 0.0, "ours: plain cross-entropy"),
    ],
    "+method=gnt": [
        Pin("method._target_", Target("NoiseTraining"), "Rusak et al. Sec. 3.1, eq. (1)"),
        Pin("method.noise", "gaussian", "Rusak et al. Sec. 3.1, eq. (1)"),
        Pin("method.sigmas", [0.5], "Rusak et al. Sec. 4: GNT sigma 0.5"),
        _RUSAK_HALF_CLEAN,
    ],
    "+method=gnt_mult": [
        Pin("method._target_", Target("NoiseTraining"), "Rusak et al. Sec. 3.1"),
        Pin("method.noise", "gaussian", "Rusak et al. Sec. 3.1"),
        Pin("method.sigmas", [0.08, 0.12, 0.18, 0.26, 0.38], "Rusak et al. Sec. 4: GNT mult sigma set"),
        _RUSAK_HALF_CLEAN,
    ],
    "+method=speckle": [
        Pin("method._target_", Target("NoiseTraining"), "Rusak et al. Sec. 4: Speckle noise training"),
        Pin("method.noise", "speckle", "Rusak et al. Sec. 4 (the ImageNet-C hold-out Speckle corruption)"),
        Pin("method.sigmas", [0.15, 0.2, 0.35, 0.45, 0.6], "SPEC: Speckle x + x n, sigma in {0.15, ..., 0.6}"),
        Pin("method.clean_fraction", 0.5, "SPEC: 50 % clean per batch for every noise training"),
    ],
    "+method=ant": [*_RUSAK_ANT, Pin("method.kernel", "1x1", "Rusak et al. Sec. 3.2: ANT1x1")],
    "+method=ant3x3": [*_RUSAK_ANT, Pin("method.kernel", "3x3", "Rusak et al. Sec. 3.2: ANT3x3 (one 3x3 layer)")],
}

# --- Schneider et al. 2020, Table 1 (pretrained ResNet-50, no / partial / full adaptation) --------------------------
_SCHNEIDER_COMMON = [
    *_torchvision_resnet50_v1("Schneider et al.", "Sec. 5 (the torchvision ResNet-50; 23.9 % IN error, Sec. 6)"),
    Pin("trainer.epochs", 0, "Schneider et al. Sec. 3: test-time adaptation of a trained model, no training"),
    *_imagenet_data("Schneider et al.", "Sec. 4"),
    Pin("@adapted.mix", frozenset({"variance"}), "Schneider et al. eq. (3): mixes means and variances"),
    Pin("@adapted.test_variance", frozenset({"biased"}),
        "Schneider et al. Prop. 1: 'the biased estimates of the target statistics'"),
    Pin("adaptation.evaluate_unadapted", True, "Schneider et al. Table 1 / Fig. 1: the non-adapted baseline"),
]
PINS["schneider_table1"] = [
    *_SCHNEIDER_COMMON,
    *_imagenet_c("Schneider et al.", "Sec. 2 (mCE, eq. 1: the C = 15 test corruptions, S = 5 severities)"),
    Pin("@holdout_set", frozenset(HOLDOUT_CORRUPTIONS),
        "Schneider et al. Sec. 4: N selected on the mCE of the 4 hold-out corruptions"),
    Pin("eval.evaluators.holdout.severities", None, "Schneider et al. Sec. 2: S = 5 severities"),
    Pin("eval.evaluators.holdout.ce_baseline", "alexnet", "Schneider et al. Sec. 4: the hold-out corruption mCE"),
    Pin("@adapted.mode", frozenset({"prior", "full"}),
        "Schneider et al. Sec. 2 / Table 1: partial (eq. 3 with prior N) and full adaptation"),
    Pin("@prior.n", [8], "Schneider et al. Sec. 2 / Table 1 caption: n = 8 for partial adaptation"),
    Pin("@prior.N", [2 ** k for k in range(11)],
        "Schneider et al. Sec. 4: 'For partial adaptation, we choose N in {2^0, ..., 2^10}'"),
    Pin("adaptation.select", "holdout_mce",
        "Schneider et al. Sec. 4: N 'selected on the holdout corruption mCE'"),
    Pin("eval.evaluators.eps_star", None, "ours: eps* is not part of Schneider's Table 1"),
]
PINS["schneider_fig1"] = [
    *_SCHNEIDER_COMMON,
    *_imagenet_c("Schneider et al.", "Sec. 2 / Fig. 1"),
    Pin("@adapted.mode", frozenset({"prior"}), "Schneider et al. eq. (3): the source prior of N pseudo-samples"),
    Pin("@prior.N", [0] + [2 ** k for k in range(11)],
        "Schneider et al. Sec. 4 (N in {2^0..2^10}) and Sec. 5 / Fig. 1 (N = 0: no prior)"),
    Pin("@prior.n", [2 ** k for k in range(10)],
        "ours: n = 1..512 in powers of two (Fig. 1's x axis; the text names n = 1, 8, 16-32)"),
    Pin("adaptation.report.metric", "mCE", "Schneider et al. Fig. 1: mCE on IN-C"),
    Pin("adaptation.report.x", "batch_size", "Schneider et al. Fig. 1: mCE vs. number of samples n"),
    Pin("adaptation.report.series", "prior_strength", "Schneider et al. Fig. 1: one line per N"),
    Pin("eval.evaluators.eps_star", None, "ours: eps* is not part of Schneider's Fig. 1"),
]

# --- Shu et al. 2021, Table 1 (AdvBN fine-tuning of a pretrained ResNet-50) -----------------------------------------
PINS["shu_table1"] = [
    *_torchvision_resnet50_v1("Shu et al.", "Sec. 5.1 ('an ImageNet pre-trained ResNet-50'; Table 2 base model "
                              "76.1 %)"),
    *_imagenet_data("Shu et al.", "Sec. 5.1"),
    Pin("dataset.augment", "crop_flip", "ours: standard ImageNet training augmentation (not stated)"),
    Pin("method._target_", Target("AdvBNTraining"), "Shu et al. Sec. 4, Algorithm 1"),
    Pin("method.layer", "layer1", "Shu et al. Sec. 5.1: after conv2_3 (torchvision layer1)"),
    Pin("method.steps", 6, "Shu et al. Sec. 5.1: m = 6"),
    Pin("method.step_size", 0.2, "Shu et al. Sec. 5.1: tau = 0.2"),
    Pin("method.eps", None, "Shu et al. Sec. 5.1: eps = m tau - 0.1 (null computes it)"),
    Pin("@method.advbn.eps", 1.1, "Shu et al. Sec. 5.1: eps = m tau - 0.1 = 1.1"),
    Pin("method.relu", True, "SPEC: the perturbed features are followed by ReLU for ResNets"),
    Pin("method.eval_bn", "both", "Shu et al. App. A.3 / Table 7: IN-C with the main BNs (Table 1) and the "
        "auxiliary BNs (Table 7)"),
    Pin("method.attack_bn_mode", "eval", "ours: the authors' released AdvBN code attacks in eval mode (running BN "
        "statistics); the paper text does not say"),
    Pin("trainer.epochs", 20, "Shu et al. Sec. 4 / Sec. 5.1: fine-tune for 20 epochs"),
    Pin("trainer.optimizer._target_", "torch.optim.SGD", "Shu et al. Sec. 5.1: SGD"),
    Pin("trainer.optimizer.lr", 1e-3, "Shu et al. Sec. 5.1: learning rate starts at 0.001"),
    Pin("trainer.optimizer.momentum", 0.9, "Shu et al. Sec. 5.1: momentum 0.9"),
    Pin("trainer.optimizer.nesterov", False, "Shu et al. Sec. 5.1: plain SGD with momentum", default=False),
    Pin("trainer.optimizer.weight_decay", 1e-4, "Shu et al. Sec. 5.1: weight decay 1e-4"),
    Pin("trainer.scheduler._target_", "torch.optim.lr_scheduler.MultiStepLR", "Shu et al. Sec. 5.1: step decay"),
    Pin("trainer.scheduler.milestones", [10], "Shu et al. Sec. 5.1: decreases after 10 epochs"),
    Pin("trainer.scheduler.gamma", 0.1, "Shu et al. Sec. 5.1: by a factor of 10"),
    Pin("trainer.scheduler_interval", "epoch", "Shu et al. Sec. 5.1: epoch-wise schedule"),
    Pin("trainer.batch_size", 32, "ours: per GPU"),
    Pin("@total_batch_size", 256, "Shu et al. Sec. 5.1: batch size 256 (32 per GPU x 8 GPUs)"),
    Pin("hydra.launcher.gpus_per_node", 8, "ours: one node of 8 GPUs"),
    Pin("hydra.launcher.tasks_per_node", 8, "ours: one DDP process per GPU"),
    *_imagenet_c("Shu et al.", "Sec. 5.1 (ImageNet-C: 15 corruptions x 5 severities, mCE)"),
    Pin("eval.evaluators.eps_star", None, "ours: eps* is not part of Shu's Table 1"),
]

# --- Tsiligkaridis & Tsiligkaridis 2022, Table 1 (CIFAR-10 / CIFAR-10-C, ResNet-18) ----------------------------------
_MAGN = "Tsiligkaridis et al."
PINS["tsiligkaridis_table1"] = [
    Pin("model._target_", Target("resnet18_cifar"), f"{_MAGN} Sec. 4 / Table 1: ResNet-18 (CIFAR stem: ours)"),
    Pin("model.width", 64, "ours: the standard ResNet-18 width"),
    Pin("dataset.name", "cifar10", f"{_MAGN} Table 1: CIFAR-10"),
    # crop + flip + color jitter + rotation, compared order-free
    Pin("dataset.augment", frozenset({"crop", "flip", "color_jitter", "rotate"}),
        f"{_MAGN} Sec. 4: 'random cropping, random horizontal flips, color jitter (0.25) and random rotation "
        "(2 degrees)'"),
    Pin("dataset.color_jitter", 0.25, f"{_MAGN} Sec. 4: color jitter (0.25)"),
    Pin("dataset.rotation_degrees", 2.0, f"{_MAGN} Sec. 4: random rotation (2 degrees)"),
    Pin("trainer.epochs", 150, f"{_MAGN} Sec. 4: 150 epochs"),
    Pin("trainer.optimizer._target_", "torch.optim.SGD", f"{_MAGN} Sec. 4: SGD"),
    Pin("trainer.optimizer.lr", 0.1, f"{_MAGN} Sec. 4: learning rate started at 0.1"),
    Pin("trainer.optimizer.momentum", 0.9, f"{_MAGN} Sec. 4: Nesterov momentum 0.9"),
    Pin("trainer.optimizer.nesterov", True, f"{_MAGN} Sec. 4: Nesterov momentum 0.9"),
    Pin("trainer.optimizer.weight_decay", 5e-4, f"{_MAGN} Sec. 4: weight decay 0.0005"),
    Pin("trainer.scheduler._target_", "torch.optim.lr_scheduler.StepLR", f"{_MAGN} Sec. 4: step decay"),
    Pin("trainer.scheduler.step_size", 50, f"{_MAGN} Sec. 4: decays every 50 epochs"),
    Pin("trainer.scheduler.gamma", 0.1, f"{_MAGN} Sec. 4: by a factor of 10"),
    Pin("trainer.scheduler_interval", "epoch", f"{_MAGN} Sec. 4: every 50 epochs"),
    Pin("@total_batch_size", 128, "ours: not stated; 128 as the AugMix reference code, one GPU per job"),
    Pin("corruptions._target_", Target("OnDiskCorruptions"), f"{_MAGN} Sec. 4: CIFAR-10-C of Hendrycks et al."),
    Pin("@corruption_set", frozenset(ALL_CORRUPTIONS) - {"gaussian_noise"},
        f"{_MAGN} Sec. 4: 'M = 18 corruptions ... The gaussian noise corruption is excluded' (Table 1 rows)"),
    Pin("eval.evaluators.corruptions.severities", None, f"{_MAGN} Sec. 4: J = 5 severity levels (null: all)"),
    Pin("eval.evaluators.corruptions.max_images", None, f"{_MAGN} Sec. 4: the 10,000 test images per subset"),
    Pin("eval.evaluators.corruptions.ce_baseline", None, f"{_MAGN} Sec. 4: mCA (no AlexNet normalization on CIFAR)"),
    Pin("eval.evaluators.clean.max_images", None, f"{_MAGN} Sec. 4: the 10,000 CIFAR-10 test images"),
    Pin("eval.evaluators.eps_star", None, "ours: eps* is not part of the MAGN paper"),
    Pin("eval.evaluators.clean.rms_binning", "paper", f"{_MAGN} Sec. 4: E_c sums over all bins (SPEC: bins of 100)"),
    Pin("eval.evaluators.corruptions.rms_binning", "paper", f"{_MAGN} Sec. 4: E_c over all bins (SPEC: bins of 100)"),
    Pin("@sweep:+method", ["standard", "pgd_at", "trades", "rse", "augmix", "magn", "magn_augmix"],
        f"{_MAGN} Table 1 columns: Standard, AT, TRADES, RSE, AugMix, MAGN, MAGN+AugMix"),
]
_LINF_8 = [
    Pin("method.eps", EPS_8_255, f"{_MAGN} Sec. 4: L-inf eps = 8/255"),
    Pin("method.steps", 7, f"{_MAGN} Sec. 4: 7 PGD steps"),
    Pin("method.norm", "linf", f"{_MAGN} Sec. 4: an L-inf adversary"),
    Pin("@method.step_size", 2.5 * EPS_8_255 / 7, f"{_MAGN} Sec. 4: step size 2.5 eps / 7"),
]
JOB_PINS["tsiligkaridis_table1"] = {
    "+method=standard": [
        Pin("method._target_", Target("StandardTraining"), f"{_MAGN} eq. (1): standard training"),
        Pin("method.label_smoothing", 0.0, f"{_MAGN} eq. (1): plain cross-entropy"),
    ],
    "+method=pgd_at": [
        Pin("method._target_", Target("PGDAdversarialTraining"), f"{_MAGN} eq. (2): AT"),
        *_LINF_8,
        Pin("method.random_init", True, "ours: Madry et al.'s random start (not stated)"),
    ],
    "+method=trades": [
        Pin("method._target_", Target("TRADES"), f"{_MAGN} eq. (3): TRADES"),
        *_LINF_8,
        Pin("method.beta", 3.0, "SPEC: TRADES beta 3 (CIFAR); the MAGN paper does not state lambda"),
    ],
    "+method=rse": [
        Pin("method._target_", Target("RandomSelfEnsemble"), f"{_MAGN} eq. (4): RSE, input noise only"),
        Pin("method.sigma", 0.1, f"{_MAGN} Sec. 4: sigma = 0.1 for RSE"),
        Pin("method.test_sigma", None, f"{_MAGN} Sec. 2: the test ensemble uses the same N(0, sigma^2 I)"),
        Pin("method.ensemble_size", 10, "ours: the ensemble size n is not stated"),
    ],
    "+method=augmix": [
        Pin("method._target_", Target("AugMixTraining"), f"{_MAGN} eq. (5): AugMix"),
        Pin("method.lambda_jsd", 12.0, "SPEC: AugMix JSD lambda 12"),
        *_augmix_options(_MAGN),
    ],
    "+method=magn": [
        Pin("method._target_", Target("MAGNTraining"), f"{_MAGN} eq. (6), Algorithm 1"),
        Pin("method.sigma_max", 0.2, f"{_MAGN} Sec. 4: sigma_max = 0.2 for all experiments"),
        Pin("method.lambda_noise", 3.0, f"ours: lambda1 = 3 as MAGN+AugMix ({_MAGN} Table 4); not stated for MAGN "
            "alone"),
        Pin("method.lambda_jsd", 0.0, f"{_MAGN} Sec. 4 / Table 1 'MAGN': eq. (6) without the AugMix JSD term"),
    ],
    "+method=magn_augmix": [
        Pin("method._target_", Target("MAGNTraining"), f"{_MAGN} eq. (6), Algorithm 1"),
        Pin("method.sigma_max", 0.2, f"{_MAGN} Sec. 4 / Table 4: (lambda1, lambda2, sigma_max) = (3, 12, 0.2)"),
        Pin("method.lambda_noise", 3.0, f"{_MAGN} Table 4: lambda1 = 3"),
        Pin("method.lambda_jsd", 12.0, f"{_MAGN} Table 4: lambda2 = 12"),
        *_augmix_options(_MAGN),
    ],
}

# --- Nandy et al. 2021 -----------------------------------------------------------------------------------------------
_NANDY_RHO1 = "Nandy et al. App. B.2 / Table 4: rho = 1 at a large batch (not restated for this table)"
PINS["nandy_table1"] = [
    *_nandy_model(),
    *_nandy_momentum(_NANDY_RHO1, 512, "Nandy et al. App. B.2 / Tables 4-5: batch 512 (converged from 64)",
                     True, "Nandy et al. Table 1: each model without and with adaptive BN"),
    *_gaussian_noise([0.0, 0.25, 0.5, 0.75], "Nandy et al. Table 1 columns: sigma = 0, 0.25, 0.5, 0.75",
                     "Nandy et al. Table 1 caption: mean +- 2 sd of 5 runs"),
]
PINS["nandy_table2"] = [
    *_nandy_model(),
    *_nandy_momentum(_NANDY_RHO1, 500, "Nandy et al. App. E.2: BN adapted on 'a large test batch-size of 500 images'",
                     True, "Nandy et al. Table 2: 'w/o adapt. BN' and 'with adapt. BN'"),
    Pin("eval.evaluators.pgd.max_images", 2000, "Nandy et al. Sec. 3 / App. B.1: a subset of 2,000 test images"),
    Pin("eval.evaluators.pgd.eot_samples", 10, "Nandy et al. Sec. 3 / App. E.2: m = 10"),
    Pin("eval.evaluators.pgd.eot_loss", "log_mean_prob", "Nandy et al. App. E.1 eq. (3): -log of the mean "
        "probability over the m models"),
    Pin("eval.evaluators.pgd.attacks.linf.norm", "linf", "Nandy et al. App. E.1: Adv_inf's threat model"),
    Pin("eval.evaluators.pgd.attacks.linf.eps", EPS_4_255, "Nandy et al. Sec. 3 / App. E.1: ||delta||_inf <= 4/255"),
    Pin("eval.evaluators.pgd.attacks.linf.steps", 100, "Nandy et al. Sec. 3 / App. E.1: 100 iterations"),
    Pin("eval.evaluators.pgd.attacks.l2.norm", "l2", "Nandy et al. App. E.1: Adv_2's threat model"),
    Pin("eval.evaluators.pgd.attacks.l2.eps", 3.0, "Nandy et al. Sec. 3 / App. E.1: ||delta||_2 <= 3"),
    Pin("eval.evaluators.pgd.attacks.l2.steps", 100, "Nandy et al. Sec. 3 / App. E.1: 100 iterations"),
    Pin("eval.evaluators.pgd.attacks.linf.random_init", True, "Nandy et al. App. E.1: 'Starting with a random "
        "initial perturbation'"),
    Pin("eval.evaluators.pgd.attacks.l2.random_init", True, "Nandy et al. App. E.1: random initial perturbation"),
    Pin("eval.evaluators.pgd.attacks.linf.step_size", None, "ours: 2.5 eps / steps (the step size eta is not "
        "stated)"),
    Pin("eval.evaluators.pgd.attacks.l2.step_size", None, "ours: 2.5 eps / steps (eta not stated)"),
    Pin("eval.evaluators.pgd.attacks.linf.restarts", 1, "ours: restarts not stated"),
    Pin("eval.evaluators.pgd.attacks.l2.restarts", 1, "ours: restarts not stated"),
]
PINS["nandy_table4"] = [
    *_nandy_model(),
    Pin("@adapted.mode", frozenset({"momentum"}), "Nandy et al. Sec. 2: momentum rho"),
    Pin("adaptation.grid.axes.momentum", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0], "Nandy et al. Table 4 columns"),
    Pin("@adapted.mix", frozenset({"std"}), "Nandy et al. Sec. 2: s_bar = rho s_t + (1 - rho) s_T (mixes std)"),
    Pin("@adapted.test_variance", frozenset({"biased"}), "ours: the biased batch variance (not stated)"),
    Pin("adaptation.n", 512, "Nandy et al. Table 4 caption: fixed test batch-size = 512"),
    Pin("adaptation.evaluate_unadapted", False, "Nandy et al. Table 4 caption: rho = 0 (in the grid) is the "
        "unadapted model"),
    *_gaussian_noise([0.5], "Nandy et al. Table 4 caption: Gaussian noise sigma = 0.5",
                     "Nandy et al. Table 4 caption: mean + 2 sd of 5 runs"),
]
PINS["nandy_table5"] = [
    *_nandy_model(),
    Pin("@adapted.mode", frozenset({"momentum"}), "Nandy et al. Sec. 2: momentum rho"),
    Pin("adaptation.grid.axes.batch_size", [8, 16, 32, 64, 128, 256, 512], "Nandy et al. Table 5 columns"),
    Pin("adaptation.rho", 1.0, "Nandy et al. Table 5 caption: fixed rho = 1"),
    Pin("@adapted.mix", frozenset({"std"}), "Nandy et al. Sec. 2: s_bar = rho s_t + (1 - rho) s_T (mixes std)"),
    Pin("@adapted.test_variance", frozenset({"biased"}), "ours: the biased batch variance (not stated)"),
    Pin("adaptation.evaluate_unadapted", True, "Nandy et al. Table 5: the '-' column (no BN adaptation)"),
    *_gaussian_noise([0.5], "Nandy et al. Table 5 caption: Gaussian noise sigma = 0.5",
                     "Nandy et al. Table 5 caption: mean + 2 sd of 5 runs"),
]
PINS["nandy_fig3"] = [
    *_nandy_model(),
    *_nandy_momentum(_NANDY_RHO1, 512, "ours: the size of the noisy adaptation batch is not stated (Sec. 3); 512 as "
                     "Table 4", False, "ours: Fig. 3 / Table 6 show the adapted models only"),
    Pin("eval.evaluators.certify.sigmas", [0.25, 0.5, 0.75], "Nandy et al. App. D: sigma in {0.25, 0.5, 0.75}"),
    Pin("eval.evaluators.certify.n0", 100, "SPEC: Cohen et al.'s CERTIFY, n0 = 100"),
    Pin("eval.evaluators.certify.n", 100000, "Nandy et al. App. D: 100,000 noisy samples"),
    Pin("eval.evaluators.certify.alpha", 0.001, "Nandy et al. Sec. 3 / App. D: certified 'with 99.9% probability'"),
    Pin("eval.evaluators.certify.max_images", 500, "Nandy et al. Sec. 3: 'a subsampled IMAGENET test set of 500 "
        "samples'"),
    Pin("eval.evaluators.certify.predict_n", 100000, "ours: Cohen et al.'s PREDICT with n = 100,000 (not in Nandy)"),
    Pin("eval.evaluators.certify.radii", Contains((0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75)),
        "Nandy et al. Table 6 columns: L2 radii 0.25 .. 2.75"),
]
PINS["nandy_table3"] = [
    *_nandy_model(),
    *_nandy_momentum(_NANDY_RHO1, 512, "Nandy et al. App. B.2 / Tables 4-5: batch 512, as Table 1 (not restated "
                     "for Table 3)", True, "Nandy et al. Table 3: w/o and with adapt. BN"),
    *_imagenet_c("Nandy et al.", "Sec. 3 / App. B.1, F.1 (mCE and relative mCE of Hendrycks & Dietterich)"),
]
PINS["nandy_fig2"] = [
    *_nandy_model(),
    *_nandy_momentum(_NANDY_RHO1, 512, "Nandy et al. App. B.2 / Tables 4-5: batch 512, as Table 1 (not restated "
                     "for Fig. 2)", False, "ours: the adapted variant draws both rows of Fig. 2 (gradients without "
                     "and with adaptive BN)"),
    Pin("eval.evaluators.loss_gradient.sigmas", Contains((0.0, 0.5, 0.75)),
        "Nandy et al. App. C / Fig. 2: sigma = 0 (clean), 0.5 and 0.75"),
]


# ---------------------------------------------------------------------------------------------- the tests
def _compose(name: str, job: list[str] = ()):
    return compose_config([f"+experiment={name}", *job, *USER_PATHS], toy=False, return_hydra_config=True)


def _jobs(cfg) -> list[str]:
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    choices = [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]
    return [" ".join(job) for job in itertools.product(*choices)] if choices else []


@pytest.mark.parametrize("name", sorted(set(FULL_EXPERIMENTS) | set(PINS)))
def test_full_recipe_matches_its_pin_table(name):
    assert name in PINS, f"no pin table for {name}: add its rows (key, paper value, source) to {__name__}.PINS"
    assert (EXPERIMENT_DIR / f"{name}.yaml").exists(), \
        f"{name} has a pin table but conf/experiment/{name}.yaml does not exist (experiment not added yet)"
    cfg = _compose(name)
    failures = check_pins(cfg, PINS[name], name)
    jobs, pinned = _jobs(cfg), sorted(JOB_PINS.get(name, {}))
    if sorted(jobs) != pinned:
        failures.append(f"{name}: sweep jobs {jobs} but job pin tables for {pinned}")
    assert not failures, "\n".join(failures)


JOB_CASES = [(name, job) for name, jobs in sorted(JOB_PINS.items()) for job in sorted(jobs)]


@pytest.mark.parametrize("name,job", JOB_CASES, ids=[f"{n}[{j}]" for n, j in JOB_CASES])
def test_sweep_job_matches_its_pin_table(name, job):
    cfg = _compose(name, job.split())
    failures = check_pins(cfg, JOB_PINS[name][job], f"{name} [{job}]")
    assert not failures, "\n".join(failures)


def test_check_pins_cites_the_source_of_a_mismatch():
    """The checker itself: tolerance on floats, strict bools, order-free sets, absent keys, defaults."""
    cfg = OmegaConf.create({"a": {"lr": 0.0010000001, "flag": 1, "names": ["y", "x"], "eps": 0.01568627,
                                  "ckpt": "???"}})
    pins = [Pin("a.lr", 1e-3, "paper Sec. 1"), Pin("a.flag", True, "paper Sec. 2"),
            Pin("a.names", frozenset({"x", "y"}), "paper Sec. 3"), Pin("a.eps", EPS_4_255, "paper Sec. 4"),
            Pin("a.missing", 5, "paper Sec. 5"), Pin("a.nesterov", False, "paper Sec. 6", default=False),
            Pin("a.ckpt", REQUIRED, "paper Sec. 7"), Pin("a.names", Contains(("x",)), "paper Sec. 8")]
    failures = check_pins(cfg, pins, "toy")
    assert failures == ["toy: a.flag = 1, expected True [paper Sec. 2]",
                        "toy: a.missing is not in the composed config; expected 5 [paper Sec. 5]"]
    assert check_pins(cfg, [Pin("a.lr", 2e-3, "paper Sec. 9")], "toy") == \
        ["toy: a.lr = 0.0010000001, expected 0.002 [paper Sec. 9]"]
    assert not matches(["x", "x"], frozenset({"x"})) and not matches([1.0, 2.0], [1.0]) and matches(3, 3.0)
