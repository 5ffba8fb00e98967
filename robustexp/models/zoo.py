"""Any torchvision or timm architecture by name, randomly initialized by default.

Pretrained weights: a torchvision weights name (``weights=IMAGENET1K_V2``) or ``pretrained=true``
for timm use those libraries' own loaders (which read their local cache and otherwise download,
so on an offline machine put the files in the cache first); a local file goes through
``model.checkpoint`` instead, loaded safely by :func:`robustexp.models.build.load_weights`.
"""

from __future__ import annotations

import difflib

from torch import nn

from robustexp.errors import ConfigError


def _unknown(name: str, library: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; did you mean {close}?" if close else ""
    return ConfigError(f"model.arch={name!r} is not a {library} model{hint} "
                       f"({len(known)} names are available; list them with {library}'s list_models())")


def torchvision_model(arch: str, num_classes: int, in_channels: int = 3, weights: str | None = None) -> nn.Module:
    """``torchvision.models.get_model(arch)``; with pretrained ``weights`` whose number of
    classes differs from the dataset's, the classification head is replaced (random init)."""
    import torchvision

    known = torchvision.models.list_models()
    if arch not in known:
        raise _unknown(arch, "torchvision", known)
    if in_channels != 3:
        raise ConfigError(f"torchvision models take RGB input; set model.input_channels=3 (gray images are "
                          f"repeated to 3 channels), not {in_channels}")
    if weights is None:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    model = torchvision.models.get_model(arch, weights=weights)
    return _replace_head(model, num_classes)


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    for attr in ("fc", "head", "classifier", "heads"):
        parent, layer = model, getattr(model, attr, None)
        while isinstance(layer, nn.Sequential):
            parent, attr, layer = layer, str(len(layer) - 1), layer[-1]
        if isinstance(layer, nn.Linear):
            if layer.out_features != num_classes:
                setattr(parent, attr, nn.Linear(layer.in_features, num_classes))
            return model
    raise ConfigError(f"cannot find the classification head of {type(model).__name__} to resize it to "
                      f"{num_classes} classes; use weights with {num_classes} classes")


def timm_model(arch: str, num_classes: int, in_channels: int = 3, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(arch, num_classes=..., in_chans=...)``."""
    import timm

    if not timm.is_model(arch):
        raise _unknown(arch, "timm", timm.list_models())
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs)

