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


# the config groups a run is composed of, in the order a user reads them
GROUPS = ("experiment", "model", "dataset", "method", "adaptation", "trainer", "eval", "corruptions", "logger",
          "debug")


def group_choices(cfg: DictConfig) -> dict[str, str]:
    """The option chosen in each config group (``{"method": "gnt", "adaptation": "bn", ...}``;
    ``"none"`` where the group is not used): what runs are grouped and filtered by.

    Taken from Hydra's runtime choices when Hydra composed the run (``hydra/launcher`` and other
    ``hydra/`` groups left out); a config composed without them (the tests' ``compose``) falls
    back to each group's ``name`` key."""
    from hydra.core.hydra_config import HydraConfig

    try:
        choices = dict(HydraConfig.get().runtime.choices)
    except ValueError:  # not inside a Hydra app
        choices = {}
    result = {}
    for group in GROUPS:
        choice = choices.get(group)
        if choice is None and group not in choices:
            node = cfg.get(group)
            choice = node.get("name") if isinstance(node, DictConfig) else None
            choice = choice if choice is not None else ("custom" if node is not None else None)
        result[group] = "none" if choice is None else str(choice)
    if result["method"] == "none":
        result["method"] = "standard"  # a run without +method is standard training
    return result
