"""Accuracy and corruption summaries against hand-computed cases."""

from __future__ import annotations

import math

import torch

from robustexp.evaluation.metrics import AccuracyMeter, corruption_summary, topk_correct
from robustexp.rendering import format_table


def test_topk_hand_case():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0],    # top1 = 1
                           [0.5, 0.2, 0.3, 0.0],    # ranks 0, 2, 1, 3
                           [0.0, 0.1, 0.2, 0.7]])   # ranks 3, 2, 1, 0
    labels = torch.tensor([1, 1, 0])
    assert topk_correct(logits, labels, (1, 2, 3, 4)) == {1: 1, 2: 1, 3: 2, 4: 3}
    assert topk_correct(logits, labels, (5,)) == {5: 3}  # k beyond the classes: all correct


def test_accuracy_meter_accumulates_in_percent():
    meter = AccuracyMeter()
    meter.update(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    meter.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    result = meter.result()
    assert result["n"] == 3 and math.isclose(result["top1"], 200 / 3)
    expected_loss = (2 * math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 3
    assert math.isclose(result["loss"], expected_loss, rel_tol=1e-5)


def test_corruption_summary_hand_case():
    top1 = {"gaussian_noise": {1: 80.0, 2: 40.0}, "contrast": {1: 90.0, 2: 70.0}, "fog": {1: 60.0, 2: 60.0}}
    s = corruption_summary(top1, clean_top1=95.0)
    assert math.isclose(s["mCA"], (80 + 40 + 90 + 70 + 60 + 60) / 6)
    assert math.isclose(s["mCA_without_noise"], (90 + 70 + 60 + 60) / 4)
    assert s["per_corruption"]["gaussian_noise"] == {"top1_mean": 60.0, "uCE": 40.0}
    assert math.isclose(s["mean_uCE"], (40 + 20 + 40) / 3)
    assert math.isclose(s["clean_gap"], 95.0 - 400 / 6)


def test_table_alignment():
    table = format_table(["name", "value"], [["a", 1.234], ["bb", 10.0]])
    lines = table.splitlines()
    assert lines[0] == "| name | value |"
    assert lines[2] == "| a    |  1.23 |" and lines[3] == "| bb   | 10.00 |"
