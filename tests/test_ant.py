"""Adversarial Noise Training (Rusak et al. 2020): generator, projection, batch split, replay, restarts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustexp.errors import ConfigError
from robustexp.main import run
from robustexp.methods.ant import AdversarialNoiseTraining
from robustexp.models.noise_generator import NoiseGenerator
from tests.conftest import compose_config, trained_like_cnn


def _record_model_inputs(model):
    """Make ``model`` keep its last input batch in ``seen["batch"]``; returns (seen, original forward)."""
    seen, original_forward = {}, model.forward

    def record(x):
        seen["batch"] = x.detach().clone()
        return original_forward(x)

    model.forward = record
    return seen, original_forward


def test_a_new_generator_outputs_nearly_its_gaussian_input():
    torch.manual_seed(0)
    for kernel in ("1x1", "3x3"):
        g = NoiseGenerator(3, kernel=kernel)
        z = g.sample_input(torch.Size((4, 3, 16, 16)), "cpu")
        centre = z[..., 1:-1, 1:-1] if kernel == "3x3" else z
        assert torch.allclose(g(z), centre, atol=1e-4)


def test_1x1_generator_has_no_spatial_receptive_field_and_3x3_a_local_one():
    torch.manual_seed(1)
    for kernel, reach in (("1x1", 0), ("3x3", 1)):
        g = NoiseGenerator(2, kernel=kernel, init_std=0.5)  # large weights: the convolutions matter
        z = g.sample_input(torch.Size((1, 2, 9, 9)), "cpu")
        changed = z.clone()
        m = g.margin
        changed[0, :, 4 + m, 4 + m] += 3.0  # one input pixel (output coordinates (4, 4))
        moved = (g(changed) - g(z)).abs().sum(1)[0] > 0
        expected = torch.zeros(9, 9, dtype=torch.bool)
        expected[4 - reach:5 + reach, 4 - reach:5 + reach] = True
        assert torch.equal(moved, expected), kernel


def test_perturbations_have_norm_eps_and_the_batch_is_split_50_30_20():
    torch.manual_seed(2)
    ant = AdversarialNoiseTraining(eps_l2=2.0, replay_every=1)
    model = trained_like_cnn()
    ant.setup(model, torch.device("cpu"))
    images = torch.rand(20, 1, 28, 28)
    images[:, :, :5] = 0.0  # saturated rows
    labels = torch.randint(0, 10, (20,))
    seen, original_forward = _record_model_inputs(model)
    for _ in range(2):  # the second step uses the replay buffer
        ant.training_step(model, images, labels)
    assert ant.split(20) == (10, 0, 6, 4)
    distance = (seen["batch"] - images).flatten(1).norm(dim=1)
    assert torch.equal(distance[:10], torch.zeros(10))
    assert torch.allclose(distance[10:], torch.full((10,), 2.0), atol=1e-4)


def test_generator_steps_raise_the_classifier_loss():
    torch.manual_seed(3)
    model = trained_like_cnn()
    model.train()
    ant = AdversarialNoiseTraining(eps_l2=3.0, generator_lr=1e-2)
    ant.setup(model, torch.device("cpu"))
    ant._new_generator(1)
    images, labels = torch.rand(64, 1, 28, 28) * 0.3, torch.randint(0, 10, (64,))

    def mean_loss():
        torch.manual_seed(11)  # the same z for both measurements
        with torch.no_grad():
            return sum(F.cross_entropy(model(ant.perturb(ant.generator, images)), labels).item() for _ in range(5)) / 5

    before = mean_loss()
    weights_before = [p.detach().clone() for p in model.parameters()]
    for _ in range(30):
        ant.generator_step(model, images, labels)
    assert mean_loss() > before
    assert all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters()))  # classifier untouched
    assert all(p.grad is None for p in model.parameters())


def test_replay_buffer_is_bounded_and_holds_copies_and_restarts_reinitialize():
    torch.manual_seed(4)
    model = trained_like_cnn()
    ant = AdversarialNoiseTraining(eps_l2=1.0, replay_every=1, replay_size=3, restart_every=5, restart_steps=2,
                                   generator_lr=1e-2)
    ant.setup(model, torch.device("cpu"))
    images, labels = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    for _ in range(4):
        ant.training_step(model, images, labels)
    assert len(ant.replay) == 3
    assert not torch.equal(ant.replay[0]["conv1.weight"], ant.replay[-1]["conv1.weight"])  # snapshots, not views
    before_restart = ant.generator.conv1.weight.detach().clone()
    ant.training_step(model, images, labels)  # step 5: restart
    assert not torch.allclose(ant.generator.conv1.weight, before_restart, atol=1e-3)
    # the state round-trips (resume)
    state = ant.state_dict()
    other = AdversarialNoiseTraining(eps_l2=1.0, replay_every=1, replay_size=3)
    other.setup(model, torch.device("cpu"))
    other.load_state_dict(state)
    assert other.steps == 5 and len(other.replay) == 3
    assert torch.equal(other.generator.conv4.weight, ant.generator.conv4.weight)


def test_bad_options():
    with pytest.raises(ConfigError, match="eps_l2 must be positive"):
        AdversarialNoiseTraining(eps_l2=0)
    with pytest.raises(ConfigError, match="must be within"):
        AdversarialNoiseTraining(eps_l2=1, clean_fraction=0.8, current_fraction=0.3)
    with pytest.raises(ConfigError, match="kernel"):
        NoiseGenerator(1, kernel="5x5")


@pytest.mark.parametrize("method", ["ant", "ant3x3"])
def test_ant_runs_from_config_and_resumes(tmp_path, method):
    metrics = run(compose_config([f"+method={method}", "method.replay_every=5", "method.restart_every=15",
                                  "method.restart_steps=3"]), tmp_path)
    assert metrics["status"] == "complete"
    assert "generator_ce" in metrics["train"]["history"][0]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert state["steps"] == 40 and len(state["replay"]) == 8


def test_ant_resumed_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from robustexp.training.trainer import Trainer
    from tests.test_runner import _comparable

    overrides = ["+method=ant", "trainer.epochs=2", "method.replay_every=3", "method.restart_every=30",
                 "method.restart_steps=2"]
    reference = run(compose_config(overrides), tmp_path / "a")
    original = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(overrides), tmp_path / "b")
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    resumed = run(compose_config(overrides), tmp_path / "b")
    assert _comparable(resumed) == _comparable(reference)


def _stylized_folder(root, classes=10):
    """A fake second source: class k holds constant images of value (k + 1) / 20, 40x40 RGB."""
    import numpy as np
    from PIL import Image

    for k in range(classes):
        (root / str(k)).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), round(255 * (k + 1) / 20), np.uint8)).save(root / str(k) / f"{i}.png")
    return root


def test_ant_sin_mixes_the_second_source_into_every_batch(tmp_path):
    torch.manual_seed(6)
    root = _stylized_folder(tmp_path / "stylized")
    ant = AdversarialNoiseTraining(eps_l2=2.0, clean_fraction=0.25, mix_fraction=0.3, current_fraction=0.27,
                                   mix_root=str(root))
    model = trained_like_cnn()
    ant.setup(model, torch.device("cpu"))
    images, labels = torch.zeros(20, 1, 28, 28), torch.zeros(20, dtype=torch.long)
    seen, original_forward = _record_model_inputs(model)
    loss, _ = ant.training_step(model, images, labels)
    assert ant.split(20) == (5, 6, 5, 4)
    batch = seen["batch"]
    assert torch.equal(batch[:5], images[:5])                        # clean
    mixed = batch[5:11]
    values = mixed.flatten(1)
    assert torch.equal(values.amax(1), values.amin(1))               # constant images: unperturbed
    classes = torch.round(values[:, 0] * 20).long() - 1              # the class the value encodes
    assert 0 <= classes.min() and classes.max() <= 9
    distance = (batch[11:] - images[11:]).flatten(1).norm(dim=1)
    assert torch.allclose(distance, torch.full((9,), 2.0), atol=1e-4)  # generator noise of norm eps
    # the loss used the mixed images' own labels: recompute it
    expected_labels = torch.cat([labels[:5], classes, labels[11:]])
    assert loss.item() == pytest.approx(F.cross_entropy(original_forward(batch), expected_labels).item(), rel=1e-5)


def test_ant_sin_needs_its_second_source(tmp_path):
    with pytest.raises(ConfigError, match="needs method.mix_root"):
        AdversarialNoiseTraining(eps_l2=1.0, mix_fraction=0.3, clean_fraction=0.25)
    with pytest.raises(ConfigError, match=r"method.mix_root is required but not set: add method.mix_root=\.\.\."):
        run(compose_config(["+method=ant_sin"]), tmp_path / "x")
    metrics = run(compose_config(["+method=ant_sin", f"method.mix_root={_stylized_folder(tmp_path / 's')}",
                                  "trainer.epochs=1"]), tmp_path / "run")
    assert metrics["status"] == "complete"


def test_generator_steps_and_restarts_leave_the_classifier_bit_identical():
    """Rusak et al. Sec. 3.2 (eq. 2 inside eq. 3): the generator is trained against the current
    classifier, which only its own step changes: no BN running statistics or batch counters
    rewritten, no gradients left on it, every module's train/eval flag as it was."""
    torch.manual_seed(7)
    model = trained_like_cnn()
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()  # a module kept in eval mode by its owner must stay so
    flags = [m.training for m in model.modules()]
    ant = AdversarialNoiseTraining(eps_l2=3.0, generator_lr=1e-2, restart_steps=5)
    ant.setup(model, torch.device("cpu"))
    ant._new_generator(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # running_mean / var, num_batches_tracked
    generator_before = ant.generator.conv4.weight.detach().clone()
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    ant.generator_step(model, images, labels)
    assert not torch.equal(ant.generator.conv4.weight, generator_before)  # the generator did learn
    ant.restart(model, images, labels)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags


def test_the_generator_attacks_the_classifier_as_evaluated():
    """The loss a generator step maximizes is the eval-mode cross-entropy of the classifier (its
    running statistics), a per-image function, not the BN statistics of a noise-only batch."""
    model = trained_like_cnn()
    model.train()
    ant = AdversarialNoiseTraining(eps_l2=3.0)
    ant.setup(model, torch.device("cpu"))
    ant._new_generator(1)
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    torch.manual_seed(8)
    noisy = ant.perturb(ant.generator, images)
    with torch.no_grad():
        evaluated = F.cross_entropy(model.eval()(noisy), labels).item()
        batch_statistics = F.cross_entropy(model.train()(noisy), labels).item()
    model.load_state_dict(trained_like_cnn().state_dict())  # undo the train-mode forward's statistics update
    assert abs(evaluated - batch_statistics) > 1e-3  # the two functions differ on this model
    torch.manual_seed(8)  # the same z
    assert ant.generator_step(model, images, labels) == pytest.approx(evaluated, rel=1e-6)


def test_a_training_step_updates_bn_statistics_once_from_the_mixed_batch():
    """Per training step BN's statistics take exactly one update, from the batch the classifier
    trains on (50 % clean / 30 % current / 20 % replayed), restarts included."""
    import copy

    torch.manual_seed(9)
    model = trained_like_cnn()
    model.train()
    reference = copy.deepcopy(model)
    ant = AdversarialNoiseTraining(eps_l2=2.0, replay_every=1, restart_every=2, restart_steps=3)
    ant.setup(model, torch.device("cpu"))
    images, labels = torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,))
    seen, _ = _record_model_inputs(model)
    for step in range(1, 4):  # step 2 restarts the generator (3 generator steps on top of its own)
        ant.training_step(model, images, labels)
        with torch.no_grad():
            reference(seen["batch"])  # the one update the classifier's batch makes (no optimizer step here)
        for (key, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(value, expected), (step, key)


@pytest.mark.parametrize("method", ["ant", "ant3x3", "ant_sin"])
def test_the_imagenet_recipe_trains_ant_at_the_papers_size(method):
    """SPEC / Rusak et al.: ImageNet eps = 135 (L2 over 3x224x224 in [0, 1]); the digits' default
    (9.5) must not leak into rusak_table3, whichever of +experiment / +method comes first (the test
    composes like tests/test_experiments.py, Hydra's basic sweeper puts its params first)."""
    from robustexp.config import instantiate_component

    paths = ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]
    extra = ["method.mix_root=/data/stylized"] if method == "ant_sin" else []
    for order in (["+experiment=rusak_table3", f"+method={method}"], [f"+method={method}", "+experiment=rusak_table3"]):
        cfg = compose_config([*order, *paths, *extra], toy=False)
        assert cfg.method.eps_l2 == 135.0
        assert instantiate_component(cfg.method, label="method").eps_l2 == 135.0
    assert compose_config([f"+method={method}", *extra], toy=False).method.eps_l2 == 9.5  # the digits' default
    assert compose_config(["+experiment=rusak_table3", f"+method={method}", *paths, *extra, "method.eps_l2=100"],
                          toy=False).method.eps_l2 == 100.0  # the command line still wins


def test_the_imagenet_recipe_uses_the_papers_noise_training_sigmas():
    """Rusak et al. Sec. 4 / Table 3: GNT sigma 0.5, GNT mult {0.08, ..., 0.38}, Speckle {0.15, ..., 0.6}."""
    paths = ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]
    expected = {"gnt": [0.5], "gnt_mult": [0.08, 0.12, 0.18, 0.26, 0.38], "speckle": [0.15, 0.2, 0.35, 0.45, 0.6]}
    for method, sigmas in expected.items():
        cfg = compose_config(["+experiment=rusak_table3", f"+method={method}", *paths], toy=False)
        assert list(cfg.method.sigmas) == sigmas and "eps_l2" not in cfg.method


def test_ant_size_is_the_clipped_size_of_the_best_gaussian_noise_training():
    """Rusak et al. Sec. 3.2: ANT's fixed sphere radius is motivated by Gaussian noise training with
    one sigma, whose best value is 0.5 (Sec. 4). After clipping to [0, 1], sigma 0.5 noise has L2
    size ~135 on 3x224x224 images whose pixels spread over [0, 1] (uniform pixels here; 131-137 on
    natural photographs), the paper's ImageNet eps; on the embedded training digits it is the
    default eps_l2 of conf/method/ant.yaml."""
    from robustexp.config import instantiate_component

    def clipped_size(images):
        generator = torch.Generator().manual_seed(0)
        noise = 0.5 * torch.randn(images.shape, generator=generator)
        return ((images + noise).clamp(0, 1) - images).flatten(1).norm(dim=1).median().item()

    spread = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert clipped_size(spread) == pytest.approx(135.0, rel=0.01)
    cfg = compose_config(["+method=ant"], toy=False)
    data = instantiate_component(cfg.dataset)
    digits = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert clipped_size(digits) == pytest.approx(cfg.method.eps_l2, rel=0.01)
