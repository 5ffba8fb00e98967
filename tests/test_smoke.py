"""debug=smoke (conf/debug/smoke.yaml, robustexp/data/synthetic.py) and `make smoke` (scripts/smoke.py):
every full recipe becomes a run on synthetic images of its shape with its own architecture, method,
adaptation and evaluators at cut budgets; the rules only lower what a recipe has."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from robustexp.config import instantiate_component
from robustexp.data.synthetic import (
    BASIC_LAUNCHER,
    cut_list,
    mark_run,
    matching_keys,
    override_value,
    smoke_overrides,
    synthetic_like,
)
from robustexp.errors import ConfigError
from robustexp.main import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
FULL = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if not p.stem.endswith("_small"))
USER_PATHS = ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]
# what the real data looks like (shape, classes), independent of robustexp.data.synthetic.SHAPES
REAL = {"imagenet": ((3, 224, 224), 1000), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
        "mnist5k": ((1, 28, 28), 10)}


def _compose(overrides, hydra_config=False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def _smoke_run_config(overrides):
    """The config a single run gets from `python -m robustexp <overrides> debug=smoke`: composed, then
    composed again by the smoke callback with its overrides (its on_run_start, as Hydra calls it)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "debug=smoke"], return_hydra_config=True)
        callback = instantiate(cfg.hydra.callbacks.smoke)
        callback.on_run_start(cfg, config_name="config")
    return cfg, callback.applied


def _evaluators(cfg):
    return {k: v for k, v in cfg.eval.evaluators.items() if v is not None}


def _sweep_params(cfg):
    return OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}


# ----------------------------------------------------------------------------- every full recipe

def test_the_full_recipes_are_found_in_the_folder():
    assert {"schneider_table1", "rusak_table3", "tsiligkaridis_table1", "nandy_fig3"} <= set(FULL)
    assert not any(name.endswith("_small") for name in FULL)


@pytest.mark.parametrize("name", FULL)
def test_full_recipe_with_debug_smoke_keeps_its_parts_and_cuts_its_sizes(name):
    recipe = _compose([f"+experiment={name}", *USER_PATHS], hydra_config=True)
    smoke, applied = _smoke_run_config([f"+experiment={name}"])

    # the real architecture, untrained, and the recipe's method, adaptation and sweep
    assert smoke.model._target_ == recipe.model._target_ and smoke.model.get("arch") == recipe.model.get("arch")
    assert smoke.model.get("weights") is None and smoke.model.get("checkpoint") is None
    assert not smoke.model.get("require_checkpoint", False)
    assert not smoke.model.get("pretrained", False)
    assert OmegaConf.select(smoke, "method.name") == OmegaConf.select(recipe, "method.name")
    assert _sweep_params(smoke) == _sweep_params(recipe)
    if recipe.get("adaptation"):
        assert smoke.adaptation.name == recipe.adaptation.name
        assert sorted(smoke.adaptation.get("variants") or {}) == sorted(recipe.adaptation.get("variants") or {})
        for axis, values in (OmegaConf.select(recipe, "adaptation.grid.axes") or {}).items():
            cut = list(smoke.adaptation.grid.axes[axis])
            assert cut == (list(values) if len(values) <= 2 else [values[0], values[-1]])  # the ends of the grid

    # synthetic images of the recipe's shape and class count, nothing read from disk
    assert smoke.dataset._target_ == "robustexp.data.synthetic.synthetic_like"
    assert smoke.dataset.name == recipe.dataset.name
    data = instantiate_component(smoke.dataset)
    assert recipe.dataset.name in REAL, "add the real data's shape and classes to REAL"
    shape, classes = REAL[recipe.dataset.name]
    assert data.input_shape == shape and data.num_classes == classes
    assert tuple(data.test[0][0].shape) == shape and len(data.train) <= 8 and len(data.test) <= 4

    # every corruption the recipe evaluates, generated at full resolution instead of read from disk
    assert smoke.corruptions._target_ == "robustexp.data.corruptions.sources.GeneratedCorruptions"
    for key, node in _evaluators(recipe).items():
        if "corruptions" in node and isinstance(node.corruptions, str):
            assert smoke.eval.evaluators[key].corruptions == node.corruptions

    # the same evaluators (none added, none dropped, none brought back from null), at cut budgets
    assert {k: v._target_ for k, v in _evaluators(smoke).items()} == \
        {k: v._target_ for k, v in _evaluators(recipe).items()}
    for key, node in _evaluators(smoke).items():
        assert node.get("batch_size") is None or node.batch_size <= (16 if key == "certify" else 4), key
        assert node.get("max_images") is None or node.max_images <= 4, key
        for option, bound in (("n0", 8), ("n", 16), ("predict_n", 8), ("repetitions", 2), ("eot_samples", 2),
                              ("grid_points", 4), ("bisection_steps", 2), ("adversarial_steps", 2), ("n_images", 2)):
            assert node.get(option) is None or not isinstance(node.get(option), int) or node[option] <= bound, \
                (key, option)
        for attack in (node.get("attacks") or {}).values():
            assert attack.steps <= 2

    # one short epoch where the recipe trains, none where it does not
    assert smoke.trainer.epochs == min(recipe.trainer.epochs, 1)
    assert smoke.trainer.batch_size <= 4

    # said, kept apart, offline
    assert smoke.tag == "smoke" and str(smoke.output_root).startswith("outputs/smoke/")
    assert smoke.logger.mode == "disabled" and smoke.runtime.num_workers == 0
    assert [str(o) for o in smoke.hydra.overrides.task] == [f"+experiment={name}", "debug=smoke", *applied]


def test_debug_smoke_wins_over_what_a_recipe_sets_itself():
    """Hydra merges +experiment after the primary config's `debug` entry: rusak_table3's own
    weights, epochs, batch size, on-disk corruptions and bf16 must still give way."""
    recipe = _compose(["+experiment=rusak_table3", *USER_PATHS], hydra_config=True)
    assert (recipe.model.weights, recipe.trainer.epochs, recipe.trainer.batch_size, recipe.runtime.amp) == \
        ("IMAGENET1K_V1", 15, 64, "bf16")
    assert recipe.hydra.runtime.choices.corruptions == "ondisk"
    smoke, applied = _smoke_run_config(["+experiment=rusak_table3"])
    assert (smoke.model.weights, smoke.trainer.epochs, smoke.trainer.batch_size, smoke.runtime.amp) == \
        (None, 1, 4, None)
    assert smoke.hydra.runtime.choices.corruptions == "generated" and "corruptions=generated" in applied
    assert smoke.trainer.optimizer.lr == recipe.trainer.optimizer.lr  # what smoke does not touch is the recipe's


def test_without_debug_the_config_is_unchanged():
    plain = _compose([], hydra_config=True)
    assert "smoke" not in plain.hydra.callbacks and plain.tag == "" and plain.output_root == "outputs"
    assert plain.dataset._target_ == "robustexp.data.embedded.mnist5k"


def test_a_smoke_run_that_cannot_be_set_up_stops_instead_of_running_the_recipe():
    """Hydra turns an exception in a callback into a warning and goes on: the callback must exit."""
    with pytest.raises(SystemExit, match=r"\+dataset.num_classes="):
        _smoke_run_config(["dataset=imagefolder", "model=torchvision"])  # an ImageFolder tree: classes unknown
    cfg, _ = _smoke_run_config(["dataset=imagefolder", "model=torchvision", "+dataset.num_classes=5"])
    assert instantiate_component(cfg.dataset).num_classes == 5


def test_a_sweep_runs_locally_and_every_job_gets_the_overrides():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        master = compose("config", overrides=["+experiment=rusak_table3", "debug=smoke"], return_hydra_config=True)
        assert "SlurmLauncher" in master.hydra.launcher._target_
        callback = instantiate(master.hydra.callbacks.smoke)
        callback.on_multirun_start(master, config_name="config")
        assert master.hydra.launcher._target_ == BASIC_LAUNCHER  # the launcher Hydra builds next
        task = [str(o) for o in master.hydra.overrides.task]
        assert task[:2] == ["+experiment=rusak_table3", "debug=smoke"] and task[2:] == callback.applied
        job = compose("config", overrides=["+method=ant", *task])  # what the sweeper composes for a job
    assert job.method.name == "ant" and job.trainer.epochs == 1 and job.model.weights is None
    assert job.corruptions._target_.endswith("GeneratedCorruptions")
    assert job.eval.evaluators.eps_star.adversarial_steps == 2


# ----------------------------------------------------------------------------- the rules

def test_rules_only_lower_what_exists():
    cfg = OmegaConf.create({
        "model": {"checkpoint": "???", "weights": "IMAGENET1K_V1"},
        "trainer": {"epochs": 0, "batch_size": 128},
        "eval": {"evaluators": {"a": {"batch_size": 500, "max_images": None, "steps": 3},
                                "b": None,
                                "c": {"batch_size": "${..a.batch_size}", "max_images": 2}}},
        "adaptation": {"grid": {"axes": {"N": [0, 1, 2, 4, 8], "n": [1]}}},
    })
    before = OmegaConf.to_container(cfg)
    overrides = smoke_overrides(
        cfg, set_values={"model.checkpoint": None, "model.weights": None, "model.pretrained": False},
        limits={"trainer.epochs": 1, "trainer.batch_size": 4, "eval.evaluators.*.batch_size": 4,
                "eval.evaluators.a.batch_size": 16, "eval.evaluators.*.max_images": 4, "eval.evaluators.*.n0": 8,
                "adaptation.grid.axes.*": 2})
    # epochs 0 stays 0; null, an interpolation and a value under the bound stay; nothing is created;
    # the last matching rule (a.batch_size: 16) wins over the wildcard before it
    assert overrides == ["model.checkpoint=null", "model.weights=null", "trainer.batch_size=4",
                         "eval.evaluators.a.batch_size=16", "adaptation.grid.axes.N=[0,8]"]
    assert OmegaConf.to_container(cfg) == before
    assert matching_keys(cfg, "eval.evaluators.*.n0") == []
    assert matching_keys(cfg, "eval.evaluators.*.batch_size") == ["eval.evaluators.a.batch_size",
                                                                  "eval.evaluators.c.batch_size"]


def test_an_on_disk_benchmark_becomes_generated_corruptions_of_its_family():
    cfg = OmegaConf.create({"corruptions": {"_target_": "x.OnDiskCorruptions", "format": "mnist_c", "root": None}})
    table = {"imagenet_c": "generated", "mnist_c": "mnist_c_generated"}
    assert smoke_overrides(cfg, corruptions=table, choice="ondisk") == ["corruptions=mnist_c_generated"]
    assert smoke_overrides(cfg, corruptions=table, choice="generated") == []
    cfg.corruptions.format = "tiny_c"
    with pytest.raises(ConfigError, match="tiny_c"):
        smoke_overrides(cfg, corruptions=table, choice="ondisk")


def test_grids_are_cut_to_points_spread_from_end_to_end():
    n = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert cut_list(n, 2) == [1, 512]
    assert cut_list(n, 3) == [1, 16, 512]   # positions 0, 4.5 -> 4, 9
    assert cut_list([0.0, 0.5], 4) == [0.0, 0.5]
    with pytest.raises(ConfigError):
        cut_list(n, 0)


@pytest.mark.parametrize("value", [None, True, 3, 0.001, -2.5, "torchvision", "a'b, c=d", [0, 1024], [1.0, None, "x,y"],
                                   {"a": 1, "b": [2, 3]}])
def test_override_values_read_back_through_hydras_parser(value):
    parsed = OverridesParser.create().parse_override(f"key={override_value(value)}").value()
    assert parsed == value


# ----------------------------------------------------------------------------- synthetic data

def test_synthetic_data_has_the_shape_classes_and_normalization_of_the_real_data():
    imagenet = synthetic_like("imagenet", n_train=3, n_test=2, image_size=224)
    assert imagenet.input_shape == (3, 224, 224) and imagenet.num_classes == 1000
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.name == "imagenet (synthetic)"
    cifar100 = synthetic_like("cifar100", n_train=5, n_test=3, augment="crop_flip")
    assert cifar100.input_shape == (3, 32, 32) and cifar100.num_classes == 100 and len(cifar100.train) == 5
    image, label = cifar100.test[0]
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1 and image.std() > 0.01
    assert 0 <= int(label) < 100
    assert synthetic_like("mnist5k").input_shape == (1, 28, 28)
    again = synthetic_like("cifar100", n_train=5, n_test=3)
    assert torch.equal(cifar100.test.images, again.test.images)           # seeded
    assert not torch.equal(cifar100.train.images[:3], cifar100.test.images)  # train and test differ


def test_synthetic_data_errors_name_the_option():
    with pytest.raises(ConfigError, match="dataset.num_classes"):
        synthetic_like("imagefolder")
    assert synthetic_like("imagefolder", num_classes=7, n_train=1, n_test=1).num_classes == 7
    with pytest.raises(ConfigError, match="dataset.name='svhn'"):
        synthetic_like("svhn")


def test_runs_are_marked_meaningless(tmp_path):
    assert not mark_run(tmp_path, "numbers meaningless")
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "complete", "summary": {"clean_top1": 0.0}}))
    (tmp_path / "summary.md").write_text("# run\n")
    assert mark_run(tmp_path, "numbers meaningless", ["trainer.epochs=1"])
    assert mark_run(tmp_path, "numbers meaningless", ["trainer.epochs=1"])  # twice: one header
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["smoke"] == {"meaningless": True, "note": "numbers meaningless", "overrides": ["trainer.epochs=1"]}
    assert metrics["summary"] == {"clean_top1": 0.0}
    assert (tmp_path / "summary.md").read_text() == "> **debug=smoke: numbers meaningless**\n\n# run\n"


# ----------------------------------------------------------------------------- end to end

def _cli(args, cwd=REPO, timeout=1800):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_single_run_and_sweep_of_a_small_recipe(tmp_path):
    run = _cli(["-m", "robustexp", "+experiment=schneider_fig1_small", "debug=smoke", f"output_root={tmp_path}/one",
                "runtime.progress=false"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("THE NUMBERS OF THIS RUN ARE MEANINGLESS") == 2  # start and end
    (metrics_file,) = (tmp_path / "one" / "runs").glob("*_smoke_*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "complete" and metrics["smoke"]["meaningless"]
    assert len(metrics["adaptation"]) == 4  # the 12 x 10 grid cut to its 2 x 2 corners
    sweep = _cli(["-m", "robustexp", "-m", "+experiment=rusak_table3_small", "debug=smoke",
                  f"output_root={tmp_path}/sweep", "runtime.progress=false"])
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "sweep" / "runs").glob("*/metrics.json")]
    assert len(runs) == 6 and all(r["status"] == "complete" and r["smoke"]["meaningless"] for r in runs)


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_make_smoke_runs_every_full_recipe(tmp_path):
    """`make smoke`: every job of every full recipe, and its report (15-25 min on 2 quiet CPU cores)."""
    result = _cli(["scripts/smoke.py", "--root", str(tmp_path)], timeout=3 * 3600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    for name in FULL:
        assert (tmp_path / name / "report" / "report.md").is_file(), name
