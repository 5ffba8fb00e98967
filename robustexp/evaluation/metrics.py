"""Accuracy and corruption-benchmark summaries. All accuracies and errors are in percent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from robustexp.data.corruptions.names import NOISE_CORRUPTIONS
from robustexp.errors import ConfigError


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of examples whose label is among the k highest logits, for each k
    (k larger than the number of classes counts every example as correct)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return {k: int(hits[:, :min(k, max_k)].any(dim=1).sum()) for k in ks}


# ImageNet-C errors of AlexNet, mean over the 5 severities (Hendrycks & Dietterich 2019).
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
    "speckle_noise": 0.845388, "gaussian_blur": 0.787108, "spatter": 0.717512, "saturate": 0.658248,
}
ALEXNET_CLEAN_ERROR = 0.43478


RMS_BINNINGS = ("paper", "hendrycks")


def check_rms_binning(binning: str, option: str = "rms_binning") -> str:
    if binning not in RMS_BINNINGS:
        raise ConfigError(f"{option}={binning!r}; expected one of {RMS_BINNINGS} (paper: every bin of 100 examples "
                          f"sorted by confidence, as the MAGN paper's Sec. 4 formula and the SPEC; hendrycks: the "
                          f"same bins with the highest-confidence one left out, as Hendrycks et al.'s calib_err)")
    return binning


def rms_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bin_size: int = 100,
                          binning: str = "paper") -> float:
    """RMS calibration error, in percent: sort by confidence, cut into adjacent bins of
    ``bin_size`` examples (the last bin takes the remainder; fewer than ``bin_size`` examples make
    one bin), and return ``sqrt(sum_b |b|/n * (acc_b - conf_b)^2)`` with ``n`` all examples.

    ``binning``:

    * ``paper`` (default): the sum runs over all bins, as the formula of Tsiligkaridis &
      Tsiligkaridis 2022 (Sec. 4, "Performance Metrics", ``E_c`` over ``i = 1..n_B``) and the SPEC;
    * ``hendrycks``: the binning of ``calib_err(confidence, correct, p='2', beta=100)`` in Hendrycks
      et al.'s ``calibration_tools.py`` (outlier-exposure; the code behind the RMS calibration error
      of AugMix and its successors), whose loop ``for i in range(len(bins) - 1)`` leaves out the
      last, highest-confidence bin (the one holding the remainder) while still weighting by the
      full ``n``. With fewer than ``2 * bin_size`` examples that leaves no bin (0.0); with fewer
      than ``bin_size`` their code fails (no bin at all), here the result is NaN.

    Ties in confidence keep their input order (stable sort; NumPy's default quicksort in the
    original need not)."""
    check_rms_binning(binning)
    n = len(confidence)
    n_full_bins = n // bin_size
    if n == 0 or (binning == "hendrycks" and n_full_bins == 0):
        return float("nan")
    order = torch.argsort(confidence.double(), stable=True)
    conf, corr = confidence.double()[order], correct.double()[order]
    edges = [i * bin_size for i in range(max(n_full_bins, 1))] + [n]
    bins = list(zip(edges[:-1], edges[1:]))
    if binning == "hendrycks":
        bins = bins[:-1]
    total = 0.0
    for start, stop in bins:
        gap = corr[start:stop].mean() - conf[start:stop].mean()
        total += (stop - start) / n * float(gap) ** 2
    return 100.0 * total ** 0.5


def select_rms_binning(result: dict, binning: str) -> dict:
    """Make ``result["rms_calibration_error"]`` (a result of :class:`AccuracyMeter`, which holds
    both ``rms_calibration_error_paper`` and ``rms_calibration_error_hendrycks``) the error of
    ``binning`` and record the choice as ``result["rms_binning"]``; returns ``result``."""
    check_rms_binning(binning)
    if "rms_calibration_error" in result:  # an AccuracyMeter result; a binning undefined for it is absent: NaN
        result["rms_calibration_error"] = result.get(f"rms_calibration_error_{binning}", float("nan"))
        result["rms_binning"] = binning
    return result


RELIABILITY_BINS = 15


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = RELIABILITY_BINS
                     ) -> dict[str, list[float]]:
    """Per equal-width confidence bin (lo, hi] (the first bin also takes confidence 0): the
    number of examples, their mean confidence and their accuracy (0 to 1; None for an empty
    bin, which keeps metrics.json plain JSON). The data of a reliability diagram and of the
    ECE; the bins of several subsets pool exactly with :func:`pool_reliability`."""
    conf, corr = confidence.double(), correct.double()
    index = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    corr_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, corr)
    return {"count": count.long().tolist(),
            "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
            "accuracy": [float(s / c) if c else None for s, c in zip(corr_sum, count)]}


def pool_reliability(bins: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """The reliability bins of the union of the subsets whose bins are given."""
    n_bins = len(bins[0]["count"])
    count, conf_sum, corr_sum = [0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    for b in bins:
        if len(b["count"]) != n_bins:
            raise ValueError("reliability bins to pool must have the same number of bins")
        for i, c in enumerate(b["count"]):
            if c:
                count[i] += c
                conf_sum[i] += c * b["confidence"][i]
                corr_sum[i] += c * b["accuracy"][i]
    return {"count": count, "confidence": [s / c if c else None for s, c in zip(conf_sum, count)],
            "accuracy": [s / c if c else None for s, c in zip(corr_sum, count)]}


def ece_from_reliability(bins: dict[str, list[float]]) -> float:
    """ECE in percent from reliability bins: ``sum_b |b|/n * |acc_b - conf_b|``."""
    n = sum(bins["count"])
    if n == 0:
        return float("nan")
    return 100.0 * sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"])
                       if c)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = RELIABILITY_BINS
                               ) -> float:
    """ECE (Guo et al. 2017), in percent: ``sum_b |b|/n * |acc_b - conf_b|`` over ``n_bins``
    equal-width confidence bins (lo, hi]."""
    if len(confidence) == 0:
        return float("nan")
    return ece_from_reliability(reliability_bins(confidence, correct, n_bins))


class AccuracyMeter:
    """Accumulates top-1 / top-5 counts, the summed cross-entropy and the (confidence,
    correct) pairs for calibration over batches. The result holds the RMS calibration error of
    both binnings (``rms_calibration_error_paper`` / ``_hendrycks``; the one not in use only where it is
    defined) and, as
    ``rms_calibration_error``, the one of ``rms_binning`` (named in the result), the ECE and the
    15 reliability bins (count, mean confidence, accuracy per bin)."""

    def __init__(self, rms_binning: str = "paper"):
        self.rms_binning = check_rms_binning(rms_binning)
        self.n = 0
        self.correct = {1: 0, 5: 0}
        self.loss_sum = 0.0
        self.confidences: list[torch.Tensor] = []
        self.hits: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for k, c in topk_correct(logits, labels, (1, 5)).items():
            self.correct[k] += c
        logits = logits.float()
        self.loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        confidence, prediction = logits.softmax(dim=1).max(dim=1)
        self.confidences.append(confidence.cpu())
        self.hits.append(prediction.eq(labels).cpu())
        self.n += len(labels)

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        confidence = torch.cat(self.confidences) if self.confidences else torch.empty(0)
        correct = torch.cat(self.hits) if self.hits else torch.empty(0)
        rms = {binning: rms_calibration_error(confidence, correct, binning=binning) for binning in RMS_BINNINGS}
        # the binnings not in use are kept where they are defined (Hendrycks' needs 100 examples): no NaN
        # enters the results of a subset that merely is small
        others = {f"rms_calibration_error_{b}": v for b, v in rms.items() if b == self.rms_binning or v == v}
        return {"top1": 100.0 * self.correct[1] / n, "top5": 100.0 * self.correct[5] / n,
                "loss": self.loss_sum / n, "rms_calibration_error": rms[self.rms_binning],
                "rms_binning": self.rms_binning,
                **others,
                "ece": expected_calibration_error(confidence, correct), "n": self.n,
                "reliability": reliability_bins(confidence, correct)}


def corruption_errors(errors: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float] | float],
                      clean_error: float | None = None, baseline_clean_error: float | None = None
                      ) -> dict[str, dict[str, float]]:
    """Corruption error and relative corruption error per corruption (Hendrycks & Dietterich 2019).

    ``errors[c][s]`` and ``baseline[c][s]`` are error rates (any unit, the same for both);
    ``baseline[c]`` may also be a single number, the baseline's mean error over the five
    severities (as the AlexNet constants are), which then stands for every severity.

    * ``CE_c = sum_s err(c, s) / sum_s err_base(c, s)``
    * ``relative_CE_c = sum_s (err(c, s) - err_clean) / sum_s (err_base(c, s) - err_base_clean)``
    Ratios are returned in percent, as papers report mCE.
    """
    out = {}
    for name, by_severity in errors.items():
        if name not in baseline:
            continue
        base = baseline[name]
        base_by_s = {s: float(base) for s in by_severity} if not isinstance(base, Mapping) else \
            {s: float(base[s]) for s in by_severity if s in base}
        if len(base_by_s) != len(by_severity):
            raise ValueError(f"the baseline lacks severities {sorted(set(by_severity) - set(base_by_s))} of {name}")
        entry = {"CE": 100.0 * sum(by_severity.values()) / sum(base_by_s.values())}
        if clean_error is not None and baseline_clean_error is not None:
            numerator = sum(e - clean_error for e in by_severity.values())
            denominator = sum(e - baseline_clean_error for e in base_by_s.values())
            entry["relative_CE"] = 100.0 * numerator / denominator
        out[name] = entry
    return out


def mean_corruption_error(per_corruption: Mapping[str, Mapping[str, float]], names) -> dict[str, float]:
    """mCE (and relative mCE) = mean of CE_c over ``names`` that are present, in percent."""
    present = [n for n in names if n in per_corruption]
    result = {"corruptions": len(present)}
    for key, out_key in (("CE", "mCE"), ("relative_CE", "relative_mCE")):
        values = [per_corruption[n][key] for n in present if key in per_corruption[n]]
        if values:
            result[out_key] = sum(values) / len(values)
    return result


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
