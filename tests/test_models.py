"""Models: normalization inside the model, safe checkpoint loading, clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from robustexp.errors import ConfigError
from robustexp.main import CONFIG_DIR
from robustexp.models.build import NormalizedClassifier, build_model
from robustexp.models.resnet_cifar import resnet18_cifar
from robustexp.models.small_cnn import SmallCNN
from tests.conftest import compose_config


def test_normalization_is_inside_the_model():
    torch.manual_seed(0)
    net = SmallCNN(num_classes=10, in_channels=3, width=8).eval()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = NormalizedClassifier(net, mean, std).eval()
    x = torch.rand(3, 3, 28, 28)
    expected = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_gray_images_are_repeated_for_rgb_networks():
    net = torch.nn.Conv2d(3, 1, 1, bias=False)
    model = NormalizedClassifier(net, (0.0,), (1.0,), net_channels=3)
    x = torch.rand(2, 1, 4, 4)
    assert torch.allclose(model(x), net(x.repeat(1, 3, 1, 1)))


def test_cifar_resnet18_has_the_cifar_stem_and_18_layers():
    net = resnet18_cifar(num_classes=10)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    weighted = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                and not (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))]
    assert len(weighted) == 18
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch,library", [("resnet5O", "torchvision"), ("not_a_model", "timm")])
def test_unknown_model_name_is_a_clear_error(arch, library):
    cfg = compose_config([f"model={library}", f"model.arch={arch}"])
    with pytest.raises(ConfigError, match=rf"model.arch='{arch}' is not a {library} model"):
        build_model(cfg.model, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_unknown_model_name_suggests_close_names():
    cfg = compose_config(["model=torchvision", "model.arch=resnet5O"])
    with pytest.raises(ConfigError, match="did you mean.*resnet50"):
        build_model(cfg.model, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "wrapped"])
def test_local_checkpoint_round_trip(tmp_path, fmt):
    torch.manual_seed(1)
    source = build_model(compose_config().model, 10, (0.1307,), (0.3081,)).eval()
    path = tmp_path / f"weights.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(source.net.state_dict(), str(path))
    elif fmt == "pt":
        torch.save(source.net.state_dict(), path)
    else:  # a run checkpoint as written by the trainer: {"model": NormalizedClassifier state}
        torch.save({"epoch": 3, "model": source.state_dict()}, path)
    loaded = build_model(compose_config([f"model.checkpoint={path}"]).model, 10, (0.1307,), (0.3081,)).eval()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), source(x))


def test_checkpoints_are_loaded_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(ConfigError, match="weights_only=True"):
        build_model(compose_config([f"model.checkpoint={path}"]).model, 10, (0.5,), (0.5,))


def test_missing_or_mismatched_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="model.checkpoint=.*nope.pt does not exist"):
        build_model(compose_config([f"model.checkpoint={tmp_path / 'nope.pt'}"]).model, 10, (0.5,), (0.5,))
    path = tmp_path / "other.pt"
    torch.save(SmallCNN(num_classes=3, in_channels=1).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit the model SmallCNN"):
        build_model(compose_config([f"model.checkpoint={path}"]).model, 10, (0.5,), (0.5,))


def test_a_required_checkpoint_that_is_not_given_is_a_clear_error(tmp_path):
    """``model.require_checkpoint: true`` (the experiments that evaluate given weights) refuses to
    build a randomly initialized model; with the checkpoint it loads it."""
    with pytest.raises(ConfigError, match=r"model.checkpoint is required .* pass model.checkpoint="):
        build_model(compose_config(["+model.require_checkpoint=true"]).model, 10, (0.5,), (0.5,))
    torch.manual_seed(0)
    saved = SmallCNN(num_classes=10, in_channels=1)
    torch.save(saved.state_dict(), tmp_path / "w.pt")
    model = build_model(compose_config(["+model.require_checkpoint=true", f"model.checkpoint={tmp_path / 'w.pt'}"]
                                       ).model, 10, (0.5,), (0.5,))
    assert torch.equal(model.net.state_dict()["features.0.weight"], saved.state_dict()["features.0.weight"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_experiments_do_not_rely_on_a_missing_checkpoint_value(name):
    """``checkpoint: ???`` in an experiment is silently replaced by the model group's null (Hydra
    keeps an existing value when a missing one is merged over it): experiments say
    ``require_checkpoint: true`` instead."""
    text = (Path(CONFIG_DIR) / "experiment" / f"{name}.yaml").read_text()
    assert "checkpoint: ???" not in text
