"""Naming and splitting a network at one of its modules.

AdvBN (:mod:`robustexp.methods.advbn`, Shu et al. 2021) fine-tunes the part of a network after a
named layer; the feature divergence (:mod:`robustexp.evaluation.feature_divergence`, Shu et al.
Sec. 5.3) measures the layers after that same layer. Both split the network here: layer names are
module names of the network inside the normalization wrapper, as in the configs.
"""

from __future__ import annotations

import difflib

from torch import nn

from robustexp.errors import ConfigError


def inner_network(model: nn.Module) -> nn.Module:
    """The network inside :class:`~robustexp.models.build.NormalizedClassifier` (``model.net``),
    or the model itself; layer names are relative to it."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def _unknown_layer(layer: str, names: list[str], net: nn.Module, option: str) -> ConfigError:
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    shallow = [n for n in names if n.count(".") <= 1]
    listed = names if len(names) <= 60 else shallow
    note = "" if len(names) <= 60 else f" (names up to depth 2 of {len(names)}; any nested name works too)"
    hint = f" Did you mean {close}?" if close else ""
    return ConfigError(f"{option}={layer!r} is not a module of {type(net).__name__}.{hint} Valid names{note}: "
                       f"{listed}")


def split_network(net: nn.Module, layer: str, option: str = "layer"
                  ) -> tuple[nn.Module, list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """``(layer module, front modules, rear modules)`` of ``net`` split after ``layer``.

    Front: the modules registered before ``layer`` (other than its ancestors), ``layer`` and its
    submodules; rear: the modules registered after them. Ancestors of ``layer`` (containers)
    belong to neither; parameters they hold themselves count as front (they are used before the
    layer's blocks, as a ViT's position embedding). An unknown ``layer`` is a ConfigError naming
    ``option`` (the config key it came from) with the valid names."""
    names = [n for n, _ in net.named_modules()][1:]  # pre-order: a module is followed by its submodules
    if not layer or layer not in names:
        raise _unknown_layer(layer, names, net, option)
    modules = dict(net.named_modules())
    index = names.index(layer)
    inside = [n for n in names if n == layer or n.startswith(layer + ".")]
    ancestors = {layer.rsplit(".", k)[0] for k in range(1, layer.count(".") + 1)}
    front = [n for n in names[:index] if n not in ancestors] + inside
    rear = names[index + len(inside):]
    return modules[layer], [(n, modules[n]) for n in front], [(n, modules[n]) for n in rear]
