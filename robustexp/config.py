"""Building components from config nodes by their ``_target_``."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from robustexp.errors import RobustexpError

META_KEYS = ("name", "corrupted")  # descriptive keys, not constructor arguments


def instantiate_component(node: DictConfig | dict, meta_keys: tuple[str, ...] = META_KEYS, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of a config group's node, leaving out descriptive keys
    (``name``), and re-raising our own input errors unwrapped so the user sees their message."""
    resolved = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    plain = {k: v for k, v in resolved.items() if k not in meta_keys}  # resolved where it sits in the run config
    try:
        return instantiate(OmegaConf.create(plain), **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, RobustexpError):
            raise cause from None
        raise
