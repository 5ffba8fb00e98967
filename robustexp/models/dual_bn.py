"""Auxiliary BatchNorm (Xie et al. 2020, AdvProp; used by Shu et al. 2021, eq. 3): every BN layer
of a sub-network becomes a :class:`DualBatchNorm` that holds the original layer (``main``) and a
copy of it (``aux``), and a switch, ``active``, set from outside with :func:`set_bn_branch` or
:func:`bn_branch`. No tag is threaded through ``forward``: a method switches the branch, runs
the model, and switches back.

State-dict keys of a converted layer ``<name>`` are ``<name>.main.*`` and ``<name>.aux.*``.
:func:`prepare_for_state_dict` converts the layers of a fresh model that a saved state dict
shows to be dual, so that a fine-tuned checkpoint loads into the architecture it came from.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from robustexp.errors import ConfigError

BRANCHES = ("main", "aux")


def check_branch(branch: str, option: str = "branch") -> str:
    if branch not in BRANCHES:
        raise ConfigError(f"{option}={branch!r}; expected one of {BRANCHES}")
    return branch


class DualBatchNorm(nn.Module):
    """Two BatchNorm layers of the same kind, ``main`` (the original layer object, so the model on
    its main branch is the model before conversion) and ``aux`` (a deep copy made at conversion:
    the same affine parameters and running statistics to start from). ``forward`` runs the
    ``active`` one; the other one is untouched (its running statistics do not move)."""

    def __init__(self, main: _BatchNorm, aux: _BatchNorm | None = None):
        super().__init__()
        if not isinstance(main, _BatchNorm):
            raise TypeError(f"DualBatchNorm wraps a BatchNorm layer, got {type(main).__name__}")
        self.main = main
        self.aux = copy.deepcopy(main) if aux is None else aux
        self.active = "main"

    def forward(self, x):
        return self.main(x) if self.active == "main" else self.aux(x)

    def branch(self, name: str) -> _BatchNorm:
        return getattr(self, check_branch(name))

    def extra_repr(self) -> str:
        return f"active={self.active}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def convert_to_dual_bn(root: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Replace BatchNorm layers of ``root`` (all of them, or those named in ``names``, names
    relative to ``root``) by :class:`DualBatchNorm` in place; returns the converted names.
    Layers that already are inside a :class:`DualBatchNorm` are left alone."""
    inside_dual = {f"{n}.{b}" if n else b for n, m in root.named_modules() if isinstance(m, DualBatchNorm)
                   for b in BRANCHES}
    candidates = {n: m for n, m in root.named_modules() if isinstance(m, _BatchNorm) and n not in inside_dual}
    if names is None:
        chosen = list(candidates)
    else:
        chosen = list(names)
        unknown = [n for n in chosen if n not in candidates]
        if unknown:
            raise ConfigError(f"cannot convert {unknown} to dual BatchNorm: not BatchNorm layers of "
                              f"{type(root).__name__} (its BatchNorm layers: {sorted(candidates)})")
    for name in chosen:
        if not name:
            raise ConfigError("the root module itself is a BatchNorm layer; wrap it in a container to convert it")
        _set_submodule(root, name, DualBatchNorm(candidates[name]))
    return chosen


def dual_bn_layers(root: nn.Module) -> list[tuple[str, DualBatchNorm]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, DualBatchNorm)]


def set_bn_branch(root: nn.Module, branch: str) -> None:
    """Make ``branch`` (``main`` or ``aux``) the active one in every :class:`DualBatchNorm` of ``root``."""
    check_branch(branch)
    for _, layer in dual_bn_layers(root):
        layer.active = branch


@contextlib.contextmanager
def bn_branch(root: nn.Module, branch: str) -> Iterator[nn.Module]:
    """``with bn_branch(model, "aux"):`` runs ``model`` on its auxiliary BNs; each layer's previous
    branch is restored on exit (also on error)."""
    check_branch(branch)
    layers = dual_bn_layers(root)
    previous = [layer.active for _, layer in layers]
    for _, layer in layers:
        layer.active = branch
    try:
        yield root
    finally:
        for (_, layer), active in zip(layers, previous):
            layer.active = active


def prepare_for_state_dict(root: nn.Module, state: Mapping[str, object]) -> list[str]:
    """Convert the BatchNorm layers of ``root`` that ``state`` (a state dict of a model with the
    same architecture) holds as dual (keys ``<layer>.main.*`` and ``<layer>.aux.*``), so that
    ``root.load_state_dict(state)`` fits. Returns the converted names."""
    names = []
    for name, module in root.named_modules():
        if isinstance(module, _BatchNorm) and name:
            if f"{name}.aux.running_mean" in state or f"{name}.aux.weight" in state:
                names.append(name)
    return convert_to_dual_bn(root, names) if names else []
