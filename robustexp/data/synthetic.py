"""``debug=smoke``: run every job of a paper recipe end to end on synthetic images of the recipe's
shape, before the recipe goes to a cluster (conf/debug/smoke.yaml).

Two parts:

* :func:`synthetic_like`, the dataset of a smoke run: random smooth images with the shape, class
  count and normalization of the recipe's dataset (ImageNet 3x224x224 and 1,000 classes, CIFAR-10
  3x32x32 and 10 ...), a handful per split, and nothing read from disk.
* :class:`SmokeRun`, a Hydra callback that applies what ``conf/debug/smoke.yaml`` cannot say as a
  config merge. Hydra merges ``+experiment=X`` *after* every entry of the primary defaults list
  (appended groups go last, and a later entry wins), so a ``debug`` group there cannot override a
  recipe's own values (``model.weights: IMAGENET1K_V1``, ``trainer.epochs: 15``, ``override
  /corruptions: ondisk``, the SLURM launcher); and a merge cannot lower a number only where the
  recipe has it (``eval.evaluators.certify.n`` set on a recipe without certification would add a
  broken evaluator). The callback turns the rules of the smoke config (``set``: values forced where
  the key exists; ``limit``: upper bounds on numbers and list lengths where the key exists) into
  command-line overrides computed from the composed recipe, which win as command-line overrides
  do: a single run is composed again with them, a sweep passes them to every job. It also prints
  the banner at start and end and marks every run's ``metrics.json`` and ``summary.md`` as a smoke
  test whose numbers are meaningless.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from robustexp.data.base import Augmentation, DataSplits, TensorImageDataset
from robustexp.data.embedded import MNIST_MEAN, MNIST_STD
from robustexp.data.ondisk import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MEAN,
    FASHION_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from robustexp.errors import ConfigError
from robustexp.utils import atomic_write_bytes, atomic_write_json, derive_seed

# ----------------------------------------------------------------------------- synthetic data

# dataset.name -> (channels, image size, classes, mean, std) of the real data. ImageNet is ILSVRC-2012
# (1,000 classes, 224 x 224 crops); an ImageFolder tree has as many classes as folders, which a smoke
# run cannot count: it needs dataset.num_classes.
SHAPES: dict[str, tuple[int, int | None, int | None, tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (3, 224, 1000, IMAGENET_MEAN, IMAGENET_STD),
    "imagefolder": (3, 224, None, IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (3, 32, 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (3, 32, 100, CIFAR100_MEAN, CIFAR100_STD),
    "mnist": (1, 28, 10, MNIST_MEAN, MNIST_STD),
    "fashion_mnist": (1, 28, 10, FASHION_MEAN, FASHION_STD),
    "mnist5k": (1, 28, 10, MNIST_MEAN, MNIST_STD),
}


def synthetic_shape(like: str, image_size: int | None = None, num_classes: int | None = None
                    ) -> tuple[tuple[int, int, int], int, tuple[float, ...], tuple[float, ...]]:
    """``((C, H, W), classes, mean, std)`` of the dataset ``like`` (a ``dataset.name``), with the
    config's ``image_size`` / ``num_classes`` where it gives them."""
    if like not in SHAPES:
        raise ConfigError(f"debug=smoke: dataset.name={like!r} has no known shape; expected one of {sorted(SHAPES)} "
                          "(or add it to robustexp.data.synthetic.SHAPES)")
    channels, size, classes, mean, std = SHAPES[like]
    size = int(image_size) if image_size is not None else size
    classes = int(num_classes) if num_classes is not None else classes
    if classes is None:
        raise ConfigError(f"debug=smoke: the number of classes of dataset {like!r} comes from its class folders; "
                          "add +dataset.num_classes=<number of classes> for the synthetic images")
    if size is None or size < 8 or classes < 2:
        raise ConfigError(f"debug=smoke: dataset {like!r} needs image_size >= 8 and num_classes >= 2, got "
                          f"{size} and {classes}")
    return (channels, size, size), classes, tuple(mean), tuple(std)


def synthetic_images(n: int, shape: tuple[int, int, int], num_classes: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` smooth random uint8 images (random 1/8-resolution noise, bilinearly upsampled, so that
    blurs, JPEG and elastic transforms have structure to act on) and labels uniform over the classes."""
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = shape
    coarse = torch.rand(n, channels, max(2, height // 8), max(2, width // 8), generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return images.mul(255).round().clamp(0, 255).to(torch.uint8), labels


def synthetic_like(like: str, n_train: int = 8, n_test: int = 4, image_size: int | None = None,
                   num_classes: int | None = None, seed: int = 0, augment="none", crop_padding: int = 4,
                   color_jitter=None, rotation_degrees: float | None = None, **on_disk_options: Any) -> DataSplits:
    """A smoke run's dataset: ``n_train`` / ``n_test`` synthetic images with the shape, classes and
    normalization of the dataset named ``like``, and its training augmentation.

    ``on_disk_options`` are the rest of the recipe's dataset config (``root``, folder names,
    ``resize``...): accepted so that the recipe's own config can be reused, and ignored, since
    nothing is read from disk."""
    del on_disk_options
    if int(n_train) < 1 or int(n_test) < 1:
        raise ConfigError(f"debug=smoke: dataset.n_train and dataset.n_test must be >= 1, got {n_train}, {n_test}")
    shape, classes, mean, std = synthetic_shape(like, image_size, num_classes)
    train_images, train_labels = synthetic_images(int(n_train), shape, classes, derive_seed(seed, "smoke", "train"))
    test_images, test_labels = synthetic_images(int(n_test), shape, classes, derive_seed(seed, "smoke", "test"))
    augmentation = Augmentation.from_config(augment, crop_padding, color_jitter, rotation_degrees)
    return DataSplits(name=f"{like} (synthetic)", train=TensorImageDataset(train_images, train_labels, augmentation),
                      test=TensorImageDataset(test_images, test_labels), num_classes=classes,
                      input_shape=shape, mean=mean, std=std, class_names=[str(c) for c in range(classes)])


# ----------------------------------------------------------------------------- smoke rules

def matching_keys(cfg: DictConfig, pattern: str) -> list[str]:
    """The dotted keys of ``cfg`` that exist and match ``pattern``, where ``*`` in a part matches
    any key at that level (``eval.evaluators.*.batch_size``). Never creates a key."""
    parts = pattern.split(".")

    def walk(node: Any, depth: int, prefix: str) -> Iterator[str]:
        if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
            return
        names = [k for k in node.keys() if fnmatch.fnmatchcase(str(k), parts[depth])]
        for name in names:
            key = f"{prefix}{name}"
            if depth == len(parts) - 1:
                yield key
            elif not OmegaConf.is_interpolation(node, name):
                yield from walk(node._get_node(name), depth + 1, key + ".")

    return list(walk(cfg, 0, ""))


def _plain(node: DictConfig, key: str) -> Any:
    """The value at ``key`` as plain Python (lists and dicts converted), resolved."""
    value = OmegaConf.select(node, key, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _is_missing(cfg: DictConfig, key: str) -> bool:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    return OmegaConf.is_missing(parent, leaf)


def _is_interpolation(cfg: DictConfig, key: str) -> bool:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    return OmegaConf.is_interpolation(parent, leaf)


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (strings quoted, lists and dicts in brackets)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                else repr(value))
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    raise ConfigError(f"debug=smoke: cannot write {value!r} ({type(value).__name__}) as a command-line override")


def cut_list(values: Sequence, keep: int) -> list:
    """At most ``keep`` items of ``values``, spread from the first to the last (the ends of a grid)."""
    values = list(values)
    if keep < 1:
        raise ConfigError(f"debug=smoke: a list limit must be >= 1, got {keep}")
    if len(values) <= keep:
        return values
    if keep == 1:
        return values[:1]
    picks = sorted({round(i * (len(values) - 1) / (keep - 1)) for i in range(keep)})
    return [values[i] for i in picks]


def limited_value(value: Any, bound: int | float) -> Any:
    """``value`` lowered to ``bound``: numbers to at most ``bound``, lists to at most ``bound``
    items (their ends); anything else (null, strings, bools) unchanged."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return type(value)(min(value, bound)) if value > bound else value
    if isinstance(value, list):
        return cut_list(value, int(bound))
    return value


def smoke_overrides(cfg: DictConfig, set_values: Mapping[str, Any] | None = None,
                    limits: Mapping[str, int | float] | None = None,
                    corruptions: Mapping[str, str] | None = None, choice: str | None = None) -> list[str]:
    """The command-line overrides that turn the composed recipe ``cfg`` into its smoke run.

    * ``set_values``: ``{key pattern: value}``; every existing key that matches is set to the value;
    * ``limits``: ``{key pattern: bound}``; every existing number that matches is lowered to the
      bound, every list cut to that many items (its ends); the last pattern that matches a key
      gives its bound, so specific rules follow the wildcards they refine. Keys the recipe does
      not have are never created; interpolations follow their source; nulls stay null;
    * ``corruptions``: ``{on-disk format: generated corruptions config}``: an on-disk benchmark
      (``choice`` is the current ``corruptions`` config) is swapped for corruptions generated at the
      images' resolution.
    """
    out: dict[str, str] = {}
    for pattern, value in (set_values or {}).items():
        for key in matching_keys(cfg, pattern):
            current = None if _is_missing(cfg, key) else _plain(cfg, key)
            if _is_missing(cfg, key) or current != value:
                out[key] = override_value(value)
    bounds: dict[str, int | float] = {}
    for pattern, bound in (limits or {}).items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound < 0:
            raise ConfigError(f"debug=smoke: limit {pattern}: {bound!r}; expected a number >= 0")
        for key in matching_keys(cfg, pattern):
            bounds[key] = bound
    for key, bound in bounds.items():
        if key in out or _is_missing(cfg, key) or _is_interpolation(cfg, key):
            continue
        value = _plain(cfg, key)
        lowered = limited_value(value, bound)
        if lowered != value:
            out[key] = override_value(lowered)
    overrides = [f"{key}={value}" for key, value in out.items()]
    if corruptions and choice == "ondisk" and "corruptions" in cfg:
        fmt = OmegaConf.select(cfg, "corruptions.format", throw_on_missing=False)
        if fmt not in corruptions:
            raise ConfigError(f"debug=smoke: no generated corruptions for the on-disk format {fmt!r}; expected one "
                              f"of {sorted(corruptions)} (hydra.callbacks.smoke.corruptions)")
        overrides.insert(0, f"corruptions={corruptions[fmt]}")
    return overrides


# ----------------------------------------------------------------------------- the callback

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
MARK_KEY = "smoke"


def _task_config(config: DictConfig) -> DictConfig:
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        task.pop("hydra", None)
    return task


class SmokeRun(Callback):
    """Applies the rules of ``conf/debug/smoke.yaml`` to the composed recipe (see the module
    docstring), prints the banner, and marks the runs' files as meaningless."""

    def __init__(self, banner: str, set: Mapping[str, Any] | None = None,  # noqa: A002 (the config's key)
                 limit: Mapping[str, int | float] | None = None, corruptions: Mapping[str, str] | None = None,
                 launcher: str | None = BASIC_LAUNCHER):
        def to_plain(m):
            return (OmegaConf.to_container(m, resolve=True) if OmegaConf.is_config(m) else dict(m or {}))
        self.banner = str(banner).strip()
        self.set_values, self.limits, self.corruptions = to_plain(set), to_plain(limit), to_plain(corruptions)
        self.launcher = launcher
        self.applied: list[str] = []

    # -------------------------------------------------------------- rules
    def overrides_for(self, config: DictConfig) -> list[str]:
        choice = OmegaConf.select(config, "hydra.runtime.choices.corruptions", default=None)
        return smoke_overrides(config, self.set_values, self.limits, self.corruptions, choice)

    def _describe(self, config: DictConfig, overrides: Sequence[str]) -> str:
        dataset = config.get("dataset") or {}
        shape, classes, _, _ = synthetic_shape(str(dataset.get("like", dataset.get("name"))),
                                               dataset.get("image_size"), dataset.get("num_classes"))
        lines = [f"data: {dataset.get('n_train')} train / {dataset.get('n_test')} test synthetic images of "
                 f"{dataset.get('name')}'s shape {'x'.join(map(str, shape))}, {classes} classes; untrained weights"]
        grids = [o for o in overrides if o.startswith("adaptation.grid.axes.")]
        if grids:
            lines.append("adaptation grid CUT to its end points: " + " ".join(grids))
        if overrides:
            lines.append("overrides over the recipe: " + " ".join(overrides))
        return "\n".join(lines)

    def _print_banner(self, when: str, details: str = "") -> None:
        rule = "=" * 100
        print(f"\n{rule}\n[robustexp] debug=smoke ({when}): {self.banner}\n{details}\n{rule}\n".replace("\n\n", "\n"),
              flush=True)

    # -------------------------------------------------------------- Hydra hooks
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Compose the run again with the smoke overrides and put the result in ``config`` (the
        object Hydra runs next). A failure stops here: without them the full recipe would run."""
        try:
            from hydra import compose

            self.applied = self.overrides_for(config)
            task = [str(o) for o in config.hydra.overrides.task]
            composed = compose(config_name=kwargs.get("config_name") or config.hydra.job.config_name,
                               overrides=[*task, *self.applied], return_hydra_config=True)
            with read_write(config), open_dict(config):
                for key in [k for k in config.keys() if k != "hydra"]:
                    del config[key]
                for key in composed.keys():
                    if key != "hydra":
                        config[key] = composed[key]
                config.hydra.overrides.task = [*task, *self.applied]
                config.hydra.runtime.choices = composed.hydra.runtime.choices
            self._print_banner("start", self._describe(config, self.applied))
        except Exception as exc:  # Hydra turns a callback's exception into a warning and would run the recipe
            raise SystemExit(f"robustexp: error: debug=smoke could not be applied: {type(exc).__name__}: {exc}") \
                from exc

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job of the sweep gets the smoke overrides; the jobs run one after the other in this
        process (Hydra's basic launcher) instead of going to SLURM."""
        try:
            self.applied = self.overrides_for(config)
            with read_write(config), open_dict(config):
                config.hydra.overrides.task = [*[str(o) for o in config.hydra.overrides.task], *self.applied]
                if self.launcher:
                    config.hydra.launcher = {"_target_": self.launcher}
            self._print_banner("start of the sweep", self._describe(config, self.applied)
                               + (f"\nlauncher: {self.launcher}" if self.launcher else ""))
        except Exception as exc:
            raise SystemExit(f"robustexp: error: debug=smoke could not be applied: {type(exc).__name__}: {exc}") \
                from exc

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if OmegaConf.select(config, "hydra.mode") == RunMode.RUN:
            run_dir = Path(config.hydra.runtime.output_dir)
        else:
            from robustexp.run_id import run_directory

            run_dir = run_directory(_task_config(config))
        mark_run(run_dir, self.banner, self.applied)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._print_banner("end")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._print_banner("end of the sweep")


def mark_run(run_dir: str | Path, banner: str, overrides: Sequence[str] = ()) -> bool:
    """Say in a run's ``metrics.json`` (key ``smoke``) and at the top of its ``summary.md`` that it
    is a smoke test whose numbers are meaningless. False if the run wrote no metrics."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return False
    metrics = json.loads(metrics_path.read_text())
    metrics[MARK_KEY] = {"meaningless": True, "note": banner, "overrides": list(overrides)}
    atomic_write_json(metrics_path, metrics)
    summary_path = run_dir / "summary.md"
    if summary_path.is_file():
        text = summary_path.read_text()
        header = f"> **debug=smoke: {banner}**\n\n"
        if not text.startswith(header):
            atomic_write_bytes(summary_path, (header + text).encode())
    return True
