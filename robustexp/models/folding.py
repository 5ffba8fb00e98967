"""BatchNorm folded into the preceding convolution for evaluation with frozen statistics (the
plain model, certification): one memory pass less per layer, the same function up to float
rounding."""

from __future__ import annotations

from torch import nn
from torch.fx.experimental.optimization import fuse

from robustexp.models.build import NormalizedClassifier


def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """A view of the model with every BatchNorm that directly follows a convolution (or linear
    layer) folded into it: ``conv'(x) = gamma (conv(x) - mu) / sqrt(var + eps) + beta`` with the
    layer's current running statistics (frozen here, so BN is a fixed affine map; the same
    function up to float rounding, one memory pass less per layer). Built with torch.fx
    (``torch.fx.experimental.optimization.fuse``) on a fresh trace: the original model, its
    modules and its adaptation hooks are left untouched; the folded convolutions are copies,
    every other layer is shared. A :class:`NormalizedClassifier` is folded inside its
    normalization. Returns the model itself where it cannot be traced."""
    try:
        if isinstance(model, NormalizedClassifier):  # its channel check is data-dependent: trace the net only
            folded = NormalizedClassifier(fuse(model.net, inplace=True), model.mean.flatten().tolist(),
                                          model.std.flatten().tolist(), model.net_channels)
            return folded.to(model.mean.device).eval()
        return fuse(model, inplace=True).eval()
    except Exception:  # noqa: BLE001 - untraceable models (data-dependent control flow) run as they are
        return model
