"""The runner end to end at toy size: outputs, resume after interruption, NaN loss."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from robustexp.adaptation.base import TestTimeAdaptation
from robustexp.errors import NonFiniteLossError
from robustexp.evaluation.base import Evaluator
from robustexp.main import run
from robustexp.methods.standard import StandardTraining
from robustexp.training.trainer import Trainer
from tests.conftest import compose_config

RESUME = ["trainer.epochs=3"]


def _comparable(metrics):
    """Everything that must not depend on interruptions (timings and paths excluded)."""
    history = [{k: v for k, v in h.items() if k != "images_per_s"} for h in metrics["train"]["history"]]
    grid = metrics["corruptions"]["grid"]
    return {"history": history, "clean": metrics["clean"], "grid": grid, "summary": metrics["summary"]}


def test_toy_run_writes_config_metrics_summary_and_checkpoints(tmp_path):
    cfg = compose_config()
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "complete"
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["summary"] == metrics["summary"]
    assert set(on_disk["corruptions"]["grid"]) == {"gaussian_noise", "contrast"}
    assert set(on_disk["corruptions"]["grid"]["contrast"]) == {"1", "3"}
    assert on_disk["clean"]["n"] == 100 and on_disk["clean"]["top1"] > 30  # well above chance after 2 epochs
    assert set(on_disk["summary"]) >= {"clean_top1", "clean_top5", "mCA", "mCA_without_noise", "mean_uCE"}
    assert (tmp_path / "config.yaml").read_text().count("n_train: 500") == 1
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and (tmp_path / "checkpoints" / "model_final.pt").is_file()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    story = (tmp_path / "main.log").read_text()  # the run's log: options, epochs, results
    assert "options: model=small_cnn, dataset=mnist5k, method=standard" in story and "epoch 2/2: loss" in story
    assert "| corruption (top-1 %)" in story and "mCA" in story and "| clean_top1" in story
    assert "corruptions: done in" in story and "eps_star: done in" in story  # milestones of the evaluation
    # a rerun of a finished config reports it instead of recomputing
    again = run(cfg, tmp_path)
    assert again["finished"] == metrics["finished"]
    assert "already holds a complete run" in (tmp_path / "main.log").read_text()


class _Interrupt(KeyboardInterrupt):
    pass


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    reference = run(compose_config(RESUME), tmp_path / "uninterrupted")

    # 1) killed right after the checkpoint of epoch 1
    calls = {"n": 0}
    original_save = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise _Interrupt()

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(RESUME), tmp_path / "interrupted")
    state = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    assert state["status"] == "interrupted"
    monkeypatch.setattr(Trainer, "_save_checkpoint", original_save)

    # 2) killed in the middle of epoch 2 (after some optimizer steps that are then lost)
    steps = {"n": 0}
    original_step = StandardTraining.training_step

    def step_then_die(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 3:
            raise _Interrupt()
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(StandardTraining, "training_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(RESUME), tmp_path / "interrupted")
    monkeypatch.setattr(StandardTraining, "training_step", original_step)
    assert torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1

    resumed = run(compose_config(RESUME), tmp_path / "interrupted")
    assert resumed["status"] == "complete"
    assert _comparable(resumed) == _comparable(reference)
    final_a = torch.load(tmp_path / "uninterrupted" / "checkpoints" / "model_final.pt", weights_only=True)
    final_b = torch.load(tmp_path / "interrupted" / "checkpoints" / "model_final.pt", weights_only=True)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


class NanAfterSteps(StandardTraining):
    """Standard training whose loss becomes NaN after ``steps`` steps (a diverging run)."""

    name = "nan_after_steps"

    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.count = steps, 0

    def training_step(self, model, images, labels):
        loss, logs = super().training_step(model, images, labels)
        self.count += 1
        return (loss * float("nan") if self.count > self.steps else loss), logs


def test_nan_loss_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    cfg = compose_config(["+method=standard", "trainer.epochs=3"])
    cfg.method = {"name": "nan", "_target_": "tests.test_runner.NanAfterSteps", "steps": 22}  # 20 steps per epoch
    match = r"training loss is nan at epoch 2, step 3 .*lower trainer.optimizer.lr"
    with pytest.raises(NonFiniteLossError, match=match):
        run(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "NonFiniteLossError" in metrics["error"]
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def test_a_diverging_learning_rate_is_caught(tmp_path):
    cfg = compose_config(["trainer.optimizer.lr=1e30", "trainer.epochs=1"])
    with pytest.raises(NonFiniteLossError, match=r"training loss is (nan|inf)"):
        run(cfg, tmp_path)


def test_a_bad_eval_option_fails_before_training(tmp_path):
    from robustexp.errors import ConfigError

    cfg = compose_config(["eval.evaluators.corruptions.corruptions=[fog,rain]"])
    with pytest.raises(ConfigError, match=r"unknown imagenet_c corruption\(s\) \['rain'\]"):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


class _CountingEvaluator(Evaluator):
    """An evaluator that records the adaptation it was called under and whether its hooks were on
    the model then (``attached``)."""

    def __init__(self, per_variant):
        self.per_variant, self.calls = per_variant, []

    def evaluate(self, model, data, ctx):
        self.calls.append((ctx.adaptation, bool(model._forward_pre_hooks)))
        return {"value": float(len(self.calls))}

    def headline(self, result):
        return {"value": result["value"]}


class _Variant(TestTimeAdaptation):
    """An adaptation that puts a hook on the model while attached."""

    def attach(self, model):
        self.handle = model.register_forward_pre_hook(lambda module, inputs: None)
        return self

    def detach(self):
        self.handle.remove()

    def reset(self):
        pass

    def describe(self):
        return "stub"


@pytest.mark.parametrize("with_unadapted", [True, False])
def test_evaluators_independent_of_the_adaptation_run_once_per_mode_on_the_unadapted_model(with_unadapted, tmp_path):
    """per_variant=False evaluators run once per mode whatever the variants, also without the unadapted model
    (``evaluate_unadapted: false``), and on the model as trained: no adaptation in their context and none of
    the variants' hooks on the model; per-variant ones run for each variant with its adaptation attached."""
    from contextlib import nullcontext

    from robustexp.adaptation.base import NoAdaptation
    from robustexp.evaluation.loop import evaluate_all
    from robustexp.run_record import RunRecord

    once, each = _CountingEvaluator(False), _CountingEvaluator(True)
    variants = {**({"none": NoAdaptation()} if with_unadapted else {}), "a": _Variant(), "b": _Variant()}
    record = RunRecord(tmp_path)
    record.start()
    model = torch.nn.Identity()
    modes = {"": lambda: nullcontext(model), "aux": lambda: nullcontext(model)}
    evaluate_all(modes, None, {"once": once, "each": each}, variants, record,
                 lambda suffix, adaptation: SimpleNamespace(adaptation=adaptation))
    assert len(once.calls) == 2 and all(not a.adapts and not hooked for a, hooked in once.calls)
    assert len(each.calls) == 2 * len(variants)
    assert [(a.adapts, hooked) for a, hooked in each.calls[:len(variants)]] == \
        [(not isinstance(v, NoAdaptation), not isinstance(v, NoAdaptation)) for v in variants.values()]
    assert set(record.metrics) >= {"once", "once@aux", "each@a", "each@aux+b"}
    assert not model._forward_pre_hooks  # every variant detached


def test_clean_to_corrupted_gap_is_reported_per_adaptation_variant(tmp_path):
    """clean_gap = clean top-1 - mCA for the unadapted model and each variant (Nandy et al. Table 3)."""
    metrics = run(compose_config(["+adaptation=full", "eval.evaluators.eps_star=null", "trainer.epochs=1"]), tmp_path)
    s = metrics["summary"]
    for suffix in ("", "@full"):
        assert s["clean_gap" + suffix] == pytest.approx(s["clean_top1" + suffix] - s["mCA" + suffix])
    assert s["clean_gap@full"] != s["clean_gap"]
