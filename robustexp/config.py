"""Building components from config nodes by their ``_target_``."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from robustexp.errors import ConfigError, RobustexpError

META_KEYS = ("name", "corrupted")  # descriptive keys, not constructor arguments


def instantiate_component(node: DictConfig | dict, meta_keys: tuple[str, ...] = META_KEYS, label: str = "",
                          **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of a config group's node, leaving out descriptive keys
    (``name``), and re-raising our own input errors unwrapped so the user sees their message.
    ``label`` (the group, e.g. ``method``) names options that are required but unset (``???``)."""
    resolved = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    plain = {k: v for k, v in resolved.items() if k not in meta_keys}  # resolved where it sits in the run config
    missing = [k for k, v in plain.items() if v == "???"]
    if missing and label:
        raise ConfigError(f"{label}.{missing[0]} is required but not set: add {label}.{missing[0]}=... to the command")
    try:
        return instantiate(OmegaConf.create(plain), **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, RobustexpError):
            raise cause from None
        raise
