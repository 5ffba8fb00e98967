"""Corruption benchmarks: metrics against hand computations, on-disk formats, the
generated/on-disk switch, the mixed control and the preview image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from robustexp.config import instantiate_component
from robustexp.data.batches import evaluation_order
from robustexp.data.corruptions.sources import OnDiskCorruptions
from robustexp.errors import ConfigError, DatasetError
from robustexp.evaluation.base import EvalContext
from robustexp.evaluation.corruptions import CorruptionEvaluator, MixedCorruptionEvaluator
from robustexp.evaluation.metrics import (
    ALEXNET_ERRORS,
    corruption_errors,
    expected_calibration_error,
    mean_corruption_error,
    rms_calibration_error,
)
from robustexp.main import CONFIG_DIR, run
from tests.conftest import compose_config, toy_overrides
from tests.test_data import _fake_cifar

# ----------------------------------------------------------------------------- metrics

def test_rms_calibration_error_hand_case():
    # 250 examples -> 250 // 100 = 2 bins, the last one extended to the end: [0, 100) and [100, 250)
    confidence = torch.cat([torch.full((100,), 0.6, dtype=torch.float64), torch.full((100,), 0.8, dtype=torch.float64),
                            torch.full((50,), 0.9, dtype=torch.float64)])
    correct = torch.cat([torch.arange(100) < 50, torch.arange(100) < 80, torch.arange(50) < 50])
    # bin 1: acc .5, conf .6; bin 2: acc 130/150, conf (80 + 45)/150 -> gap 5/150
    expected = math.sqrt(100 / 250 * 0.1 ** 2 + 150 / 250 * (5 / 150) ** 2)
    assert math.isclose(rms_calibration_error(confidence, correct), 100 * expected, rel_tol=1e-9)
    # order of the examples does not matter, only their confidence
    perm = torch.randperm(250, generator=torch.Generator().manual_seed(0))
    assert math.isclose(rms_calibration_error(confidence[perm], correct[perm]), 100 * expected, rel_tol=1e-9)


def test_rms_calibration_error_of_a_perfectly_calibrated_set_is_zero():
    confidence = torch.cat([torch.full((100,), 0.7, dtype=torch.float64), torch.full((100,), 0.9, dtype=torch.float64)])
    correct = torch.cat([torch.arange(100) < 70, torch.arange(100) < 90])
    assert rms_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-9)


def test_ece_hand_case():
    confidence = torch.tensor([0.05, 0.10, 0.55, 0.95, 1.0], dtype=torch.float64)
    correct = torch.tensor([0, 1, 1, 1, 0])
    # 15 bins (k/15, (k+1)/15]: 0.05 and 0.10 share bin 0 (0, 1/15]? 0.10 > 0.0667 -> bin 1
    # bins: {0.05}: |0 - .05|; {0.10}: |1 - .10|; {0.55}: |1 - .55|; {0.95, 1.0}: |0.5 - 0.975|
    expected = (0.05 + 0.90 + 0.45 + 2 * 0.475) / 5
    assert math.isclose(expected_calibration_error(confidence, correct), 100 * expected, rel_tol=1e-9)


def test_ce_and_relative_ce_hand_case_against_alexnet():
    # a model with error 0.5 at every severity of gaussian noise and clean error 0.2
    errors = {"gaussian_noise": {str(s): 0.5 for s in range(1, 6)}}
    per = corruption_errors(errors, ALEXNET_ERRORS, clean_error=0.2, baseline_clean_error=0.43478)
    assert math.isclose(per["gaussian_noise"]["CE"], 100 * 0.5 / 0.886428, rel_tol=1e-12)
    assert math.isclose(per["gaussian_noise"]["relative_CE"], 100 * (0.5 - 0.2) / (0.886428 - 0.43478), rel_tol=1e-12)


def test_ce_with_a_baseline_run_sums_over_severities():
    errors = {"fog": {"1": 10.0, "2": 30.0}, "contrast": {"1": 20.0, "2": 20.0}}
    baseline = {"fog": {"1": 20.0, "2": 60.0}, "contrast": {"1": 10.0, "2": 30.0}}
    per = corruption_errors(errors, baseline, clean_error=5.0, baseline_clean_error=10.0)
    assert per["fog"]["CE"] == pytest.approx(100 * 40 / 80)
    assert per["contrast"]["CE"] == pytest.approx(100 * 40 / 40)
    assert per["fog"]["relative_CE"] == pytest.approx(100 * (5 + 25) / (10 + 50))
    summary = mean_corruption_error(per, ["fog", "contrast", "snow"])
    assert summary["corruptions"] == 2 and summary["mCE"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="lacks severities"):
        corruption_errors({"fog": {"3": 1.0}}, baseline)


# ----------------------------------------------------------------------------- on-disk formats

CIFAR_TOY = ["dataset=cifar10", "model.width=4", "trainer.epochs=0",
             "eval.evaluators.corruptions.corruptions=[gaussian_noise,contrast]",
             "eval.evaluators.corruptions.severities=[1,2,3,4,5]", "eval.evaluators.clean.batch_size=7",
             "eval.evaluators.corruptions.batch_size=7"]


def _strip_toy(overrides):
    return [o for o in overrides if not o.startswith(("dataset.n_", "eval.evaluators.corruptions.corruptions",
                                                       "eval.evaluators.corruptions.severities"))]


def _compose_cifar(tmp_path, *extra):
    root = tmp_path / "cifar"
    if not root.exists():
        _fake_cifar(root)
    overrides = [*CIFAR_TOY, f"dataset.root={root}", *extra]
    if any(o.startswith("corruptions=") for o in extra):
        overrides = [o for o in overrides if not o.startswith("corruptions.")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*_strip_toy(toy_overrides(overrides)), *overrides])


def test_generated_and_on_disk_corruptions_are_one_switch(tmp_path):
    """Write the generated corruptions in CIFAR-10-C format, then evaluate the same eval config
    on both sources: identical grids (the reference engine's 8-bit output round-trips exactly)."""
    cfg = _compose_cifar(tmp_path)
    data = instantiate_component(cfg.dataset)
    source = instantiate_component(cfg.corruptions)
    ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False)
    c_root = tmp_path / "CIFAR-10-C"
    c_root.mkdir()
    order = evaluation_order(len(data.test))  # generated batches come in this order; files are in index order
    for name in ("gaussian_noise", "contrast"):
        images = []
        for severity in range(1, 6):
            batches = [b for b, _ in source.batches(data, name, severity, 7, ctx)]
            in_order = torch.empty_like(torch.cat(batches))
            in_order[order] = torch.cat(batches)
            images.append((in_order * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        np.save(c_root / f"{name}.npy", np.concatenate(images))
    np.save(c_root / "labels.npy", np.tile(data.test.labels.numpy(), 5))

    generated = run(cfg, tmp_path / "generated")
    ondisk = run(_compose_cifar(tmp_path, "corruptions=ondisk", f"dataset.corrupted.root={c_root}"),
                 tmp_path / "ondisk")
    assert ondisk["corruptions"]["grid"] == generated["corruptions"]["grid"]
    assert "cifar_c files in" in ondisk["corruptions"]["source"]


def test_cifar_c_severity_slices_and_errors(tmp_path):
    data = instantiate_component(_compose_cifar(tmp_path).dataset)
    root = tmp_path / "c"
    root.mkdir()
    images = np.stack([np.full((32, 32, 3), 10 * s, np.uint8) for s in range(1, 6) for _ in range(2)])
    np.save(root / "fog.npy", images)
    np.save(root / "labels.npy", np.arange(10) % 3)
    source = OnDiskCorruptions("cifar_c", str(root))
    x, y = source.load(data, "fog", 4, [0, 1], seed=0)
    assert torch.allclose(x, torch.full_like(x, 40 / 255)) and y.tolist() == [0, 1]
    with pytest.raises(DatasetError, match=r"snow.npy not found; expected <root>/<corruption>.npy"):
        source.size(data, "snow", 1)
    with pytest.raises(DatasetError, match="dataset.corrupted.root=.*nowhere does not exist"):
        OnDiskCorruptions("cifar_c", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="corruptions.format='tiff'"):
        OnDiskCorruptions("tiff", str(root))


def test_imagenet_c_folders_use_the_clean_class_indices(tmp_path):
    from robustexp.data.base import DataSplits, TensorImageDataset

    classes = ["n01", "n02", "n03"]
    data = DataSplits("toy", TensorImageDataset(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1)),
                      TensorImageDataset(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1)), 3,
                      (3, 8, 8), (0.5,) * 3, (0.5,) * 3, class_names=classes)
    for wnid, value in (("n02", 100), ("n03", 200)):  # n01 absent from this subset
        folder = tmp_path / "fog" / "3" / wnid
        folder.mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / "a.png")
    source = OnDiskCorruptions("imagenet_c", str(tmp_path))
    x, y = source.load(data, "fog", 3, [0, 1], seed=0)
    assert y.tolist() == [1, 2] and torch.allclose(x[1], torch.full((3, 8, 8), 200 / 255))
    with pytest.raises(DatasetError, match=r"fog/5 not found; expected <root>/<corruption>/<severity 1..5>"):
        source.size(data, "fog", 5)


def test_mnist_c_folders_on_the_embedded_data(tmp_path):
    root = tmp_path / "mnist_c"
    for name in ("shear", "stripe"):
        (root / name).mkdir(parents=True)
        np.save(root / name / "test_images.npy", np.full((6, 28, 28, 1), 255, np.uint8))
        np.save(root / name / "test_labels.npy", np.arange(6))
    cfg = compose_config(["trainer.epochs=0", "corruptions=ondisk", f"dataset.corrupted.root={root}",
                          "eval.evaluators.corruptions.corruptions=[shear,stripe]",
                          "eval.evaluators.corruptions.severities=null"])
    metrics = run(cfg, tmp_path / "run")
    assert set(metrics["corruptions"]["grid"]) == {"shear", "stripe"}
    assert metrics["corruptions"]["grid"]["shear"]["1"]["n"] == 6
    with pytest.raises(ConfigError, match=r"severities=\[3\] do not exist in mnist_c"):
        run(compose_config(["trainer.epochs=0", "corruptions=ondisk", f"dataset.corrupted.root={root}",
                            "eval.evaluators.corruptions.corruptions=[shear]",
                            "eval.evaluators.corruptions.severities=[3]"]), tmp_path / "bad")


def test_generated_mnist_c_runs_from_config(tmp_path):
    cfg = compose_config(["trainer.epochs=0", "corruptions=mnist_c_generated", "dataset.n_test=20",
                          "eval.evaluators.corruptions.corruptions=common",
                          "eval.evaluators.corruptions.severities=null"])
    metrics = run(cfg, tmp_path)
    assert len(metrics["corruptions"]["grid"]) == 15
    assert all(set(by_s) == {"1"} for by_s in metrics["corruptions"]["grid"].values())


# ----------------------------------------------------------------------------- CE from a baseline run

def test_mce_normalized_by_a_baseline_run(tmp_path):
    baseline = run(compose_config(), tmp_path / "baseline")
    cfg = compose_config([f"eval.evaluators.corruptions.ce_baseline={tmp_path / 'baseline'}"])
    again = run(cfg, tmp_path / "same")  # the same config against itself: CE = 100 everywhere
    summary = again["corruptions"]["summary"]
    assert summary["mCE"] == pytest.approx(100.0) and summary["relative_mCE"] == pytest.approx(100.0)
    assert again["summary"]["mCE"] == pytest.approx(100.0)
    assert baseline["corruptions"]["grid"] == again["corruptions"]["grid"]
    with pytest.raises(ConfigError, match="ce_baseline=alexnet normalizes by AlexNet"):
        run(compose_config(["corruptions=mnist_c_generated", "eval.evaluators.corruptions.severities=null",
                            "eval.evaluators.corruptions.corruptions=common",
                            "eval.evaluators.corruptions.ce_baseline=alexnet"]), tmp_path / "x")


# ----------------------------------------------------------------------------- mixed control, preview

class _RecordingSource(OnDiskCorruptions):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def load(self, data, name, severity, indices, seed):
        self.calls.append((seed // 10007, name, severity, len(indices)))
        return super().load(data, name, severity, indices, seed)


def test_mixed_control_mixes_batches_and_keeps_per_image_predictions(tmp_path):
    cfg = _compose_cifar(tmp_path)
    data = instantiate_component(cfg.dataset)
    root = tmp_path / "c"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("fog", "snow"):
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5 * 4, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(data.test.labels.numpy(), 5))
    torch.manual_seed(0)
    from robustexp.models.build import build_model

    model = build_model(cfg.model, data.num_classes, data.mean, data.std).eval()
    ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False)
    per_subset = CorruptionEvaluator(OnDiskCorruptions("cifar_c", str(root)), ["fog", "snow"], None, 3).evaluate(
        model, data, ctx)
    recording = _RecordingSource("cifar_c", str(root))
    mixed = MixedCorruptionEvaluator(recording, ["fog", "snow"], None, batch_size=8, seed=1).evaluate(model, data, ctx)
    # in eval mode a prediction does not depend on its batch: per-subset accuracy is unchanged
    for name in ("fog", "snow"):
        for s in map(str, range(1, 6)):
            assert mixed["grid"][name][s]["top1"] == per_subset["grid"][name][s]["top1"]
    assert mixed["overall"]["n"] == 40
    subsets_per_batch = {}
    for batch, name, severity, _ in recording.calls:
        subsets_per_batch.setdefault(batch, set()).add((name, severity))
    assert max(len(v) for v in subsets_per_batch.values()) >= 4  # batches of 8 drawn from 10 subsets mix them


def test_preview_image_is_written_on_request(tmp_path):
    cfg = compose_config(["trainer.epochs=0", "eval.evaluators.corruptions.preview_images=2", "dataset.n_test=20"])
    run(cfg, tmp_path)
    image = Image.open(tmp_path / "corruption_preview.png")
    assert image.size[0] > image.size[1]  # 2 images x (clean + 2 severities) columns, 2 corruption rows
    assert not (tmp_path.parent / "corruption_preview.png").exists()
    cfg = compose_config(["trainer.epochs=0", "dataset.n_test=20"])
    run(cfg, tmp_path / "none")
    assert not (tmp_path / "none" / "corruption_preview.png").exists()


def test_evaluation_visits_a_class_sorted_test_set_in_shuffled_batches():
    from robustexp.data.batches import test_batches

    data = instantiate_component(compose_config(["dataset.n_test=200"]).dataset)
    assert torch.equal(data.test.labels, data.test.labels.sort().values)  # stored sorted by class
    ctx = EvalContext(run_dir=".", device=torch.device("cpu"), seed=0, progress=False)
    batches = list(test_batches(data.test, 8, ctx))
    mixed = sum(len(torch.unique(y)) > 1 for _, y in batches)
    assert mixed >= 0.9 * len(batches)  # i.i.d. batches, not one class per batch
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(data.test.labels.tolist())
    again = list(test_batches(data.test, 50, ctx))  # the same order whatever the batch size
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.cat([x for x, _ in again]))
    subset = torch.cat([y for _, y in test_batches(data.test, 50, ctx, max_images=40)])
    assert len(subset) == 40 and len(torch.unique(subset)) > 5  # a random subset, not the first class
