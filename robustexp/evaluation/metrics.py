"""Accuracy and corruption-benchmark summaries. All accuracies and errors are in percent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from robustexp.data.corruptions.names import NOISE_CORRUPTIONS


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of examples whose label is among the k highest logits, for each k
    (k larger than the number of classes counts every example as correct)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return {k: int(hits[:, :min(k, max_k)].any(dim=1).sum()) for k in ks}


class AccuracyMeter:
    """Accumulates top-1 / top-5 counts and the summed cross-entropy over batches."""

    def __init__(self):
        self.n = 0
        self.correct = {1: 0, 5: 0}
        self.loss_sum = 0.0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for k, c in topk_correct(logits, labels, (1, 5)).items():
            self.correct[k] += c
        self.loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        self.n += len(labels)

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"top1": 100.0 * self.correct[1] / n, "top5": 100.0 * self.correct[5] / n,
                "loss": self.loss_sum / n, "n": self.n}


def corruption_summary(top1: Mapping[str, Mapping[int | str, float]], clean_top1: float | None = None
                       ) -> dict[str, object]:
    """Summaries of a corruption grid ``top1[corruption][severity]`` (percent).

    * ``mCA``: mean accuracy over all corruptions x severities;
    * ``mCA_without_noise``: the same without the noise category (gaussian, shot, impulse),
      the number Rusak et al. report for noise-trained models;
    * per corruption: mean accuracy over severities and the unnormalized corruption error
      ``uCE_c = mean_s err(c, s)`` = 100 - mean accuracy;
    * ``mean_uCE``: the mean of ``uCE_c`` over corruptions (= 100 - mCA on a full grid);
    * ``clean_gap``: clean top-1 minus mCA, when clean accuracy is given.

    Normalized CE / mCE (AlexNet or a baseline run as denominator) are computed elsewhere.
    """
    per_corruption = {}
    for name, by_severity in top1.items():
        values = [float(v) for v in by_severity.values()]
        mean_acc = sum(values) / len(values)
        per_corruption[name] = {"top1_mean": mean_acc, "uCE": 100.0 - mean_acc}
    all_values = [float(v) for by_severity in top1.values() for v in by_severity.values()]
    without_noise = [float(v) for name, by_severity in top1.items() if name not in NOISE_CORRUPTIONS
                     for v in by_severity.values()]
    summary: dict[str, object] = {
        "mCA": sum(all_values) / len(all_values) if all_values else float("nan"),
        "mCA_without_noise": sum(without_noise) / len(without_noise) if without_noise else float("nan"),
        "mean_uCE": (sum(p["uCE"] for p in per_corruption.values()) / len(per_corruption)
                     if per_corruption else float("nan")),
        "per_corruption": per_corruption,
    }
    if clean_top1 is not None:
        summary["clean_gap"] = clean_top1 - summary["mCA"]
    return summary
