"""Test-time adaptation of BatchNorm statistics (Schneider et al. 2020; Nandy et al. 2021).

Every BatchNorm layer of the model (ours, torchvision's, timm's ``BatchNormAct2d``: any
``torch.nn.modules.batchnorm._BatchNorm``) gets a forward pre-hook. The model stays in eval
mode, so each layer normalizes with its running buffers; the hook writes the adapted statistics
into those buffers before the layer runs. The source statistics are kept aside and restored by
:meth:`BatchNormAdaptation.reset`, which the evaluators call before every subset: adapted
statistics never leak from one corruption or severity to the next.

Conventions (the ones a paper's number depends on):

* test statistics ``mu_t, var_t`` are the per-channel mean and variance of the current batch over
  (N, H, W); ``var_t`` is the **biased** variance by default (what BatchNorm normalizes with in
  training mode, so that N = 0 reproduces train-mode BN exactly); ``test_variance=unbiased``
  divides by (m - 1) instead, m = values per channel.
* source statistics ``mu_s, var_s`` are the layer's running buffers as trained (PyTorch keeps an
  exponential average of *unbiased* batch variances).
* ``prior`` (Schneider et al., eq. 3): ``mu = N/(N+n) mu_s + n/(N+n) mu_t`` and the same weights on
  the variances; n is the number of images in the batch, N the prior strength in pseudo-samples.
* ``momentum`` (Nandy et al., Sec. 3): ``rho`` weights the test statistics,
  ``mu = rho mu_t + (1 - rho) mu_s``; the paper writes the mixing on the standard deviation
  (``mix=std``: ``s = rho s_t + (1 - rho) s_s``), PyTorch's BN momentum mixes variances
  (``mix=variance``, the default). rho = 0 is the unadapted model, rho = 1 full batch statistics.
* ``full``: the statistics of the whole subset, estimated in one pass before predicting (each
  layer sees inputs normalized by batch statistics upstream, as when the running averages are
  re-estimated in train mode), then frozen; mean and biased variance over all its images.

Computation (the statistics are the cost of adapting: a few percent of a forward pass): a batch's
mean and variance are two passes in float32, the mean, then the mean of squared deviations from
it, formed in chunks of images of at most 1 MiB (no cancellation; PyTorch's float32 sums are
cascaded, so both are within a few float32 ulp of a float64 computation). ``full`` combines the
per-batch (count, mean, sum of squared deviations) in float64 with the parallel-variance formula
of Chan et al. (1979), so the subset's variance keeps that precision however many batches and
however large the mean against the spread.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from robustexp.adaptation.base import TestTimeAdaptation
from robustexp.errors import ConfigError

MODES = ("prior", "momentum", "full")


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


# the squared deviations are formed in chunks of images of at most this many values (1 MiB of
# float32): a temporary of a whole large batch (16 MiB for 64 CIFAR images at 64 channels) leaves
# the caches and page-faults fresh memory on every call; chunks of it run 2-3x faster
_DEVIATION_CHUNK = 1 << 18


def batch_statistics(x: torch.Tensor, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of (N, C, ...) over every axis but C, in float32: the mean,
    then the mean of the squared deviations from it (two passes, no cancellation; several times
    faster on CPU than ``Tensor.var``, whose reduction is a scalar float64 Welford loop, and far
    more accurate than ``torch.batch_norm_update_stats``, whose channels_last kernel sums the rows
    one after another: 1e-4 relative error at 64 CIFAR images). Any layout (contiguous,
    channels_last, BatchNorm1d's (N, C)); the deviations are summed in chunks of images."""
    dims = [d for d in range(x.ndim) if d != 1]
    if x.dtype != torch.float32:
        x = x.float()
    mean = x.mean(dims, keepdim=True)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    per_image = x[0].numel() if len(x) else 0
    if len(x) < 2 or per_image * len(x) <= _DEVIATION_CHUNK:
        var = (x - mean).square_().mean(dims)
    else:
        images = max(1, _DEVIATION_CHUNK // per_image)
        chunks = x.split(images)
        var = (chunks[0] - mean).square_().sum(dims)
        for chunk in chunks[1:]:
            var += (chunk - mean).square_().sum(dims)
        var /= count
    if unbiased:
        var = var * (count / (count - 1)) if count > 1 else torch.full_like(var, float("nan"))
    return mean.flatten(), var


def mix_statistics(source_mean, source_var, target_mean, target_var, weight_on_target: float, mix: str = "variance"):
    """Convex combination of source and target statistics, on the variance or on the std."""
    w = float(weight_on_target)
    mean = torch.add((1.0 - w) * source_mean, target_mean, alpha=w)   # (1 - w) source + w target
    if mix == "variance":
        var = torch.add((1.0 - w) * source_var, target_var, alpha=w)
    elif mix == "std":
        var = (w * target_var.clamp_min(0).sqrt() + (1.0 - w) * source_var.clamp_min(0).sqrt()) ** 2
    else:
        raise ConfigError(f"adaptation mix={mix!r}; expected 'variance' or 'std'")
    return mean, var


class BatchNormAdaptation(TestTimeAdaptation):
    """Adapt the BatchNorm statistics of a model at test time.

    Args:
        mode: ``prior`` (needs ``prior_strength`` N), ``momentum`` (needs ``momentum`` rho) or ``full``.
        prior_strength: N, pseudo-samples of source statistics (Schneider et al. eq. 3).
        momentum: rho, weight of the test statistics (Nandy et al.).
        batch_size: n, images per test batch the statistics are estimated from (the evaluators use it
            as their batch size); ``full`` estimates over the whole subset and predicts in batches of n.
        mix: ``variance`` or ``std``: which quantity is mixed.
        test_variance: ``biased`` or ``unbiased`` estimate of the batch variance.
        freeze_after: adapt on the first batch of a subset, then keep those statistics (the
            adapt-then-freeze protocol that certification and attacks need).
    """

    def __init__(self, mode: str = "prior", prior_strength: float | None = None, momentum: float | None = None,
                 batch_size: int | None = None, mix: str = "variance", test_variance: str = "biased",
                 freeze_after: bool = False):
        if mode not in MODES:
            raise ConfigError(f"adaptation mode={mode!r}; expected one of {MODES}")
        if mode == "prior" and (prior_strength is None or prior_strength < 0):
            raise ConfigError(f"adaptation mode=prior needs prior_strength N >= 0, got {prior_strength}")
        if mode == "momentum" and (momentum is None or not 0 <= momentum <= 1):
            raise ConfigError(f"adaptation mode=momentum needs momentum rho in [0, 1], got {momentum}")
        if test_variance not in ("biased", "unbiased"):
            raise ConfigError(f"adaptation test_variance={test_variance!r}; expected 'biased' or 'unbiased'")
        if mix not in ("variance", "std"):
            raise ConfigError(f"adaptation mix={mix!r}; expected 'variance' or 'std'")
        self.mode, self.prior_strength, self.momentum = mode, prior_strength, momentum
        self.batch_size, self.mix, self.test_variance = batch_size, mix, test_variance
        self.freeze_after = freeze_after
        self.estimates_subset = mode == "full"
        self._layers: list[tuple[str, _BatchNorm]] = []
        self._source: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks = []
        self._state = "adapt"   # adapt | frozen | accumulate | off
        self._sums: dict[int, list] = {}   # full: per layer [mean, sum of squared deviations, count], float64
        self._scaled_source: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}  # w, (1-w) mu_s, (1-w) var_s

    freezable = True

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module) -> BatchNormAdaptation:
        if self._hooks:
            raise RuntimeError("this adaptation is already attached to a model")
        self._layers = batchnorm_layers(model)
        if not self._layers:
            raise ConfigError(f"test-time BN adaptation needs BatchNorm layers; {type(model).__name__} has none")
        for _, layer in self._layers:
            if layer.running_mean is None or layer.running_var is None:
                raise ConfigError("BN adaptation needs layers that track running statistics (source statistics)")
            self._source[id(layer)] = (layer.running_mean.detach().clone(), layer.running_var.detach().clone())
            self._hooks.append(layer.register_forward_pre_hook(self._hook))
        self._state = "adapt"
        return self

    def detach(self) -> None:
        self.reset()
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._layers, self._source, self._scaled_source = [], [], {}, {}

    def reset(self) -> None:
        """Back to the source statistics, ready to adapt to a new subset."""
        for _, layer in self._layers:
            mean, var = self._source[id(layer)]
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        self._state = "adapt"
        self._sums = {}

    def freeze(self) -> None:
        """Keep the statistics of the last adapted batch for every following batch."""
        self._state = "frozen"

    # ------------------------------------------------------------------ statistics
    def weight_on_target(self, n: int) -> float:
        if self.mode == "prior":
            return n / (self.prior_strength + n) if (self.prior_strength + n) > 0 else 1.0
        if self.mode == "momentum":
            return float(self.momentum)
        return 1.0

    def _hook(self, layer: _BatchNorm, inputs):
        if self._state in ("frozen", "off"):
            return None
        x = inputs[0].detach()
        unbiased = self.test_variance == "unbiased"
        if self._state == "accumulate":
            mean_t, var_biased = batch_statistics(x)
            count = x.numel() // x.shape[1]
            self._accumulate(layer, mean_t, var_biased, count)
            var_t = var_biased
            if unbiased:
                var_t = var_biased * (count / (count - 1)) if count > 1 else torch.full_like(var_biased, float("nan"))
            self._write(layer, mean_t, var_t)  # normalize with this batch while estimating
            return None
        mean_t, var_t = batch_statistics(x, unbiased=unbiased)
        w = self.weight_on_target(x.shape[0])
        running_mean, running_var = layer.running_mean, layer.running_var
        if self.mix == "variance" and running_mean.dtype == mean_t.dtype and running_var.dtype == var_t.dtype:
            # mix_statistics' (1 - w) * source + w * target (the same float operations, so the same
            # values), written straight into the buffers in one operation each, with (1 - w) * source
            # computed once per w
            if w == 1.0:
                running_mean.copy_(mean_t)
                running_var.copy_(var_t)
                return None
            scaled = self._scaled_source.get(id(layer))
            if scaled is None or scaled[0] != w:
                source_mean, source_var = self._source[id(layer)]
                scaled = (w, (1.0 - w) * source_mean, (1.0 - w) * source_var)
                self._scaled_source[id(layer)] = scaled
            torch.add(scaled[1], mean_t, alpha=w, out=running_mean)
            torch.add(scaled[2], var_t, alpha=w, out=running_var)
            return None
        source_mean, source_var = self._source[id(layer)]
        self._write(layer, *mix_statistics(source_mean, source_var, mean_t, var_t, w, self.mix))
        return None

    @staticmethod
    def _write(layer: _BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)

    def _accumulate(self, layer: _BatchNorm, mean: torch.Tensor, var_biased: torch.Tensor, count: int) -> None:
        """Add one batch to the layer's running (mean, sum of squared deviations, count) in float64
        (Chan et al.'s parallel combination: exact up to float rounding, no cancellation)."""
        mean, m2 = mean.double(), var_biased.double() * count
        state = self._sums.get(id(layer))
        if state is None:
            self._sums[id(layer)] = [mean, m2, count]
            return
        mean_a, m2_a, count_a = state
        total = count_a + count
        delta = mean - mean_a
        state[0] = mean_a + delta * (count / total)
        state[1] = m2_a + m2 + delta.square() * (count_a * count / total)
        state[2] = total

    @torch.no_grad()
    def estimate_full(self, model: nn.Module, batches: Iterable, device: torch.device) -> None:
        """Full adaptation: statistics of the whole subset (mean and biased variance over all its
        images, per layer), then frozen."""
        self.reset()
        self._state = "accumulate"
        model.eval()
        for images, _ in batches:
            model(images.to(device))
        for _, layer in self._layers:
            mean, m2, count = self._sums[id(layer)]
            var = m2 / (count - 1 if self.test_variance == "unbiased" and count > 1 else count)
            self._write(layer, mean, var.clamp_min(0))
        self._state = "frozen"

    def prepare_subset(self, model: nn.Module, batches: Iterable, device: torch.device) -> None:
        if self.estimates_subset:
            self.estimate_full(model, batches, device)

    def label(self) -> str:
        """``bn-prior-N16-n8``, ``bn-momentum-rho1-n512-std``, ``bn-full``."""
        label = f"bn-{self.mode}"
        if self.mode == "prior":
            label += f"-N{self.prior_strength:g}"
        if self.mode == "momentum":
            label += f"-rho{self.momentum:g}"
        if self.batch_size:
            label += f"-n{self.batch_size}"
        if self.mix != "variance":
            label += f"-{self.mix}"
        return label

    def describe(self) -> str:
        if self.mode == "prior":
            what = f"prior N={self.prior_strength:g}, n={self.batch_size}"
        elif self.mode == "momentum":
            what = f"momentum rho={self.momentum:g}, n={self.batch_size}"
        else:
            what = "full (whole subset)"
        return f"BN adaptation, {what}, {self.test_variance} test variance mixed on the {self.mix}"
