"""Build the model of a run from its config, wrap it with input normalization, load weights."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustexp.config import instantiate_component
from robustexp.errors import ConfigError

MODEL_META_KEYS = ("name", "checkpoint", "input_channels", "require_checkpoint")


class NormalizedClassifier(nn.Module):
    """``net((x - mean) / std)`` for images ``x`` in [0, 1].

    Keeping normalization inside the model lets methods, corruptions, noise and attacks all
    work in pixel space. One-channel images are repeated to ``net_channels`` when the network
    expects RGB (a torchvision ResNet on MNIST, say).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], net_channels: int | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.net_channels = net_channels or len(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if x.shape[1] != self.net_channels:
            x = x.expand(-1, self.net_channels, -1, -1) if x.shape[1] == 1 else x
        return self.net(x)


def build_model(model_cfg: DictConfig | Mapping, num_classes: int, mean: Sequence[float], std: Sequence[float]
                ) -> NormalizedClassifier:
    """Instantiate ``model_cfg`` (a ``_target_`` plus arguments) with the dataset's number of
    classes and channels, load ``model_cfg.checkpoint`` if given, and add normalization."""
    cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True)) if not isinstance(model_cfg, DictConfig) \
        else model_cfg
    net_channels = cfg.get("input_channels") or len(mean)
    if "_target_" not in cfg:
        raise ConfigError(f"model config {cfg.get('name', '?')!r} has no _target_")
    if cfg.get("require_checkpoint") and not cfg.get("checkpoint"):
        # An experiment that evaluates or fine-tunes given weights says so with require_checkpoint: true.
        # (``checkpoint: ???`` in an experiment file does not work: Hydra keeps the model group's
        # ``checkpoint: null`` when merging a missing value over it, and the run would silently use
        # random weights.)
        raise ConfigError(f"model.checkpoint is required by this run (model.require_checkpoint=true) but is "
                          f"{cfg.get('checkpoint')!r}: pass model.checkpoint=<a local .pt/.pth or .safetensors "
                          f"file> with the weights to evaluate or fine-tune")
    net = instantiate_component(cfg, meta_keys=MODEL_META_KEYS, num_classes=num_classes, in_channels=net_channels)
    if cfg.get("checkpoint"):
        load_weights(net, cfg.checkpoint)
    return NormalizedClassifier(net, mean, std, net_channels=net_channels)


def _unreadable(path: Path, exc: Exception, expected: str) -> str:
    """The error text for a weights file that cannot be read at all: truncated (an interrupted copy
    or download) or not a weights file, rather than torch's bare ``[Errno 22] Invalid argument``."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unexpected end of file"
    return (f"model.checkpoint={path}: cannot read it ({type(exc).__name__}: {reason}); the file "
            f"({path.stat().st_size} bytes) looks truncated or damaged; expected {expected}: copy or download it again")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file loaded with ``weights_only=True``
    (no arbitrary code is unpickled). Accepts our run checkpoints (``{"model": ...}``) and the
    common ``state_dict`` / ``model`` / ``module.`` wrappings."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.checkpoint={path} does not exist (expected a .pt/.pth or .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a torn header
            raise ConfigError(_unreadable(path, exc, "a complete .safetensors file")) from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises OSError, EOFError, RuntimeError... for damaged files
            refused = any(text in str(exc) for text in ("Unsupported global", "Weights only load failed")) or \
                zipfile.is_zipfile(path)
            if isinstance(exc, pickle.UnpicklingError) and refused:
                # a readable file that holds more than tensors: torch's text names the refused global
                raise ConfigError(f"model.checkpoint={path}: cannot load it with weights_only=True ({exc})") from exc
            raise ConfigError(_unreadable(path, exc, "a complete .pt/.pth file written by torch.save")) from exc
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ConfigError(f"model.checkpoint={path}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(net: nn.Module, path: str | Path) -> None:
    """Load weights into ``net`` (the network inside the normalization wrapper). Weights saved
    from a :class:`NormalizedClassifier` (keys ``net.*``, ``mean``, ``std``) are accepted too."""
    state = read_state_dict(path)
    if any(k.startswith("net.") for k in state):
        state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    from robustexp.models.dual_bn import prepare_for_state_dict

    prepare_for_state_dict(net, state)  # an AdvBN fine-tune saved main + auxiliary BNs: rebuild the pairs
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"model.checkpoint={path} does not fit the model {type(net).__name__}: {exc}") from exc
