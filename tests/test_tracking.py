"""W&B runs as dashboard material, read back from the offline run files (tests/wandb_records.py):
config keys, summary, define_metric, the corruption grid table, plots, attached files, and the
whole training curve in the final attempt of a resumed run. Real wandb, offline; no mock."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from robustexp.config import group_choices
from robustexp.main import run
from robustexp.tracking import GRID_COLUMNS, WandbTracker, certified_accuracy_rows
from robustexp.training.trainer import Trainer
from tests import wandb_records as wr
from tests.conftest import compose_config

OFFLINE_BN = ["logger.mode=offline", "+adaptation=bn", "adaptation.n=50", "eval.evaluators.eps_star=null",
              "dataset.n_train=200", "dataset.n_test=50"]  # small: this test is about what W&B receives


def _attempts(run_dir: Path) -> dict[str, tuple[Path, list]]:
    """The files directory and records of each offline W&B run of ``run_dir`` (one per attempt), by status."""
    attempts = {}
    for path in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        records = wr.records(path)
        attempts[wr.summary(records)["status"]] = (path.parent / "files", records)
    return attempts


def _train_rows(records) -> list[dict]:
    return [{k.removeprefix("train/"): v for k, v in row.items() if k.startswith("train/")}
            for row in wr.history(records) if "train/epoch" in row]


def _media(records, key: str) -> dict:
    """The value (``_type``, ``path``, ...) of a table or image logged under ``key``."""
    (row,) = [r for r in wr.history(records) if f"{key}/_type" in r]
    return {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(key + "/")}


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == pytest.approx(b, rel=1e-12, abs=1e-12) if isinstance(b, float) else a == b


def test_resumed_run_holds_choices_summary_grid_table_plots_files_and_the_whole_training_curve(tmp_path,
                                                                                               monkeypatch):
    run_dir = tmp_path / "run"
    cfg = compose_config(OFFLINE_BN)
    # attempt 1: stopped right after the checkpoint of epoch 1 (as by a kill / requeue)
    original_save = Trainer._save_checkpoint

    def save_then_stop(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        raise KeyboardInterrupt()

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir)
    monkeypatch.undo()
    # attempt 2: resumes from that checkpoint, trains epoch 2 only, evaluates
    metrics = run(compose_config(OFFLINE_BN), run_dir)
    assert metrics["status"] == "complete"
    wr.flush()
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    history = on_disk["train"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]

    attempts = _attempts(run_dir)
    assert set(attempts) == {"interrupted", "complete"}
    (first_files, first), (files_dir, final) = attempts["interrupted"], attempts["complete"]
    assert wr.exit_code(first) == 1
    assert [r["epoch"] for r in _train_rows(first)] == [1]
    assert wr.exit_code(final) == 0

    # config: the option of every group at the top level, the resolved config under cfg
    config = wr.config(final)
    for group, choice in group_choices(cfg).items():
        assert config[group] == choice, group
    assert config["method"] == "standard" and config["model"] == "small_cnn" and config["dataset"] == "mnist5k"
    assert config["adaptation"].startswith("bn")
    assert (config["run_id"], config["seed"], config["tag"], config["sweep_group"]) == (on_disk["run_id"], 0, "", None)
    assert config["cfg"] == OmegaConf.to_container(cfg, resolve=True)

    # training curves against the epoch, and the whole curve in the final attempt (epoch 1 back-filled once)
    definitions = wr.metrics(final)
    assert definitions["train/*"].step_metric == "train/epoch"
    assert "train/epoch" in definitions
    rows = _train_rows(final)
    assert sorted(r["epoch"] for r in rows) == [1, 2]
    assert sorted(rows, key=lambda r: r["epoch"]) == history  # every key, exactly the stored values

    # summary: the headline numbers under metrics.json's names, status, and the final epoch
    summary = wr.summary(final)
    assert on_disk["summary"] and {"mCA@bn", "clean_top1@bn", "mean_uCE"} <= set(on_disk["summary"])
    for key, value in on_disk["summary"].items():
        assert _close(summary[key], value), key
    assert summary["status"] == "complete"
    assert summary["train/epoch"] == 2 and summary["train/loss"] == history[-1]["loss"]

    # the corruption grid, every variant, as one table
    table = _media(final, "corruption_grid")
    assert table["_type"] == "table-file"
    stored = json.loads((files_dir / table["path"]).read_text())
    assert stored["columns"] == GRID_COLUMNS
    expected = []
    for key, variant in (("corruptions", "none"), ("corruptions@bn", "bn")):
        for corruption, by_severity in on_disk[key]["grid"].items():
            for severity, r in by_severity.items():
                expected.append([variant, "corruptions", corruption, int(severity), r["top1"], r["top5"],
                                 100 - r["top1"], r["rms_calibration_error"], r["ece"], r["n"]])
    assert len(expected) == 8  # 2 corruptions x 2 severities x 2 variants
    assert sorted(map(tuple, stored["data"])) == sorted(map(tuple, expected))

    # one image per PNG of the run directory, the same bytes
    pngs = {p.stem: p for p in run_dir.glob("*.png")}
    assert {"reliability_clean", "reliability_clean@bn", "reliability_corrupted",
            "reliability_corrupted@bn"} <= set(pngs)
    images = {key.removeprefix("plots/").removesuffix("/_type") for row in wr.history(final) for key, v in row.items()
              if key.startswith("plots/") and key.endswith("/_type") and v == "image-file"}
    assert images == set(pngs)
    for stem, png in pngs.items():
        image = _media(final, f"plots/{stem}")
        assert image["sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
        assert (files_dir / image["path"]).read_bytes() == png.read_bytes()

    # metrics.json and summary.md attached, as they were at the end of each attempt
    saved = wr.saved_files(final)
    assert "metrics.json" in saved and "summary.md" in saved
    assert json.loads((files_dir / "metrics.json").read_text()) == on_disk
    assert (files_dir / "summary.md").read_text() == (run_dir / "summary.md").read_text()
    assert "metrics.json" in wr.saved_files(first)
    assert json.loads((first_files / "metrics.json").read_text())["status"] == "interrupted"


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 6), (200, 30, 30)).save(path)
    return path


def test_unreadable_png_and_malformed_grid_are_left_out_with_a_warning_and_the_run_closes(tmp_path, caplog):
    _png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "metrics.json").write_text("{}")
    metrics = {"status": "complete", "summary": {"mCA": 50.0},
               "corruptions": {"grid": {"fog": {"one": {"top1": 1.0}}}}}  # a severity that is not a number
    tracker = WandbTracker(mode="offline")
    tracker.start(tmp_path, name="robustness-check", config={"seed": 3, "tag": "t"}, choices={"method": "gnt"})
    with caplog.at_level(logging.WARNING, logger="robustexp.tracking"):
        tracker.record_run(tmp_path, metrics)
    tracker.finish()
    wr.flush()
    assert not tracker.lost  # W&B itself kept working
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("broken.png" in w and "left out" in w for w in warnings), warnings
    assert any("corruption_grid" in w and "left out" in w for w in warnings), warnings
    records = wr.records(wr.run_file(tmp_path))
    assert wr.exit_code(records) == 0
    config = wr.config(records)
    assert (config["method"], config["seed"], config["tag"]) == ("gnt", 3, "t")
    assert wr.summary(records)["mCA"] == 50.0 and wr.summary(records)["status"] == "complete"
    logged = {k for row in wr.history(records) for k in row}
    assert "plots/good/_type" in logged and not any(k.startswith(("plots/broken", "corruption_grid")) for k in logged)
    assert "metrics.json" in wr.saved_files(records) and "summary.md" not in wr.saved_files(records)


def test_epochs_already_in_a_resumed_run_are_not_sent_again(tmp_path):
    # online, the run is resumed by id; what it holds is read from its summary at start. Here that
    # reading is done on an offline run that already holds epochs 1-2 (no network in tests).
    tracker = WandbTracker(mode="offline")
    tracker.start(tmp_path, name="dedup", config={})
    for epoch in (1, 2):
        tracker.log({"train/epoch": epoch, "train/loss": 1.0 / epoch})
    tracker.logged_epochs.clear()  # as in a new attempt of the same W&B run
    tracker._read_sent_epochs()
    assert tracker.sent_through_epoch == 2
    tracker.log({"train/epoch": 2, "train/loss": 0.5})   # retrained after a lost checkpoint: already sent
    tracker.log({"train/epoch": 3, "train/loss": 0.33})
    history = [{"epoch": e, "loss": 1.0 / e} for e in (1, 2, 3, 4)]  # epoch 4: not logged by this attempt
    tracker.record_run(tmp_path, {"status": "complete", "summary": {}, "train": {"history": history}})
    tracker.finish()
    wr.flush()
    records = wr.records(wr.run_file(tmp_path))
    assert [r["epoch"] for r in _train_rows(records)] == [1, 2, 3, 4]  # each epoch exactly once
    assert wr.summary(records)["train/epoch"] == 4 and wr.summary(records)["train/loss"] == 0.25


def test_certified_accuracy_rows_cover_every_sigma_and_the_envelope():
    metrics = {"certify@bn": {"sigmas": {"0.25": {"certified_accuracy": {"0": 0.8, "0.5": 0.4}},
                                         "0.5": {"certified_accuracy": {"0": 0.6, "0.5": 0.5}}},
                              "envelope": {"certified_accuracy": {"0": 0.8, "0.5": 0.5}}},
               "clean": {"top1": 90.0}}
    assert certified_accuracy_rows(metrics) == [
        ["bn", "certify", "0.25", 0.0, 80.0], ["bn", "certify", "0.25", 0.5, 40.0],
        ["bn", "certify", "0.5", 0.0, 60.0], ["bn", "certify", "0.5", 0.5, 50.0],
        ["bn", "certify", "envelope", 0.0, 80.0], ["bn", "certify", "envelope", 0.5, 50.0]]
