"""Every config file composes, and every model config builds a working classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from robustexp.main import CONFIG_DIR
from robustexp.models.build import build_model
from tests.conftest import compose_config

APPENDED_GROUPS = ("method", "adaptation")  # selected with +group=option


def _options():
    for group_dir in sorted(Path(CONFIG_DIR).iterdir()):
        # experiment, debug: tests of their own
        if group_dir.is_dir() and group_dir.name not in ("hydra", "experiment", "debug"):
            for path in sorted(group_dir.glob("*.yaml")):
                yield group_dir.name, path.stem


@pytest.mark.parametrize("group,option", list(_options()), ids=lambda x: str(x))
def test_every_config_option_composes(group, option):
    prefix = "+" if group in APPENDED_GROUPS else ""
    cfg = compose_config([f"{prefix}{group}={option}"], toy=False, return_hydra_config=True)
    container = {key: OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=False)
                 if OmegaConf.is_config(cfg[key]) else cfg[key] for key in cfg if key != "hydra"}
    assert group in container
    if group == "adaptation":
        node = container[group]
        templates = list((node.get("variants") or {}).values())
        templates += [node["grid"]["template"]] if "grid" in node else []
        assert templates and all("_target_" in v for v in templates)
    elif group != "eval":
        assert "_target_" in container[group]
    assert cfg.hydra.run.dir.startswith("outputs/runs/")


def test_primary_config_has_no_method_or_adaptation_in_defaults():
    cfg = compose_config(toy=False)
    assert "method" not in cfg and "adaptation" not in cfg
    assert set(cfg) >= {"model", "dataset", "trainer", "eval", "logger", "seed"}


def test_run_directory_is_named_from_the_config():
    a = compose_config(["seed=0"], return_hydra_config=True)
    b = compose_config(["seed=0", "logger.mode=offline", "runtime.num_workers=2"], return_hydra_config=True)
    c = compose_config(["seed=1"], return_hydra_config=True)
    d = compose_config(["seed=0", "+method=standard"], return_hydra_config=True)
    assert a.hydra.run.dir == b.hydra.run.dir  # logger / runtime do not change results
    assert a.hydra.run.dir != c.hydra.run.dir
    assert Path(d.hydra.run.dir).name.startswith("standard_small-cnn_mnist5k_s0_")
    assert Path(c.hydra.run.dir).name.startswith("standard_small-cnn_mnist5k_s1_")


@pytest.mark.parametrize("model,extra,channels,size", [
    ("small_cnn", [], 1, 28),
    ("resnet18_cifar", ["model.width=8"], 3, 32),
    ("torchvision", ["model.arch=resnet18"], 1, 32),   # gray input repeated to RGB
    ("timm", ["model.arch=resnet18"], 3, 32),
])
def test_model_configs_build_and_classify(model, extra, channels, size):
    cfg = compose_config([f"model={model}", *extra])
    mean, std = (0.5,) * channels, (0.25,) * channels
    net = build_model(cfg.model, num_classes=7, mean=mean, std=std).eval()
    with torch.no_grad():
        logits = net(torch.rand(2, channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
