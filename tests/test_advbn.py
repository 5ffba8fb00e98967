"""AdvBN (Shu et al. 2021): the layer's mathematics (eqs. 1-2, Algorithm 1), the dual-BN conversion
(eq. 3), the frozen front, the PGD-aux-BN baseline, and a toy run with both BN branches evaluated."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from robustexp.errors import ConfigError
from robustexp.methods.advbn import AdvBN, AdvBNTraining, PGDAuxBNTraining
from robustexp.models.build import NormalizedClassifier
from robustexp.models.dual_bn import (
    DualBatchNorm,
    bn_branch,
    convert_to_dual_bn,
    dual_bn_layers,
    prepare_for_state_dict,
)
from robustexp.models.splitting import split_network
from robustexp.training.trainer import TrainContext, Trainer
from tests.conftest import compose_config, trained_like_cnn

CPU = torch.device("cpu")


def _classifier(seed=0):
    return NormalizedClassifier(trained_like_cnn(seed), mean=[0.5], std=[0.25])


def _batch(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _rear_loss(model, layer_name, images, labels):
    """CE of the model with the output of ``layer_name`` replaced by the argument."""
    layer = model.net.get_submodule(layer_name)

    def loss(features):
        handle = layer.register_forward_hook(lambda *_: features)
        try:
            return F.cross_entropy(model(images), labels)
        finally:
            handle.remove()
    return loss


def _fitted_classifier(images, labels, steps=40):
    """A classifier that fits the batch (low loss), so that a loss increase is clearly measurable."""
    model = _classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


def _features(model, layer_name, images):
    out = []
    handle = model.net.get_submodule(layer_name).register_forward_hook(lambda m, i, o: out.append(o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return out[0]


# ---------------------------------------------------------------------------- the layer
def test_perturbation_sets_channel_mean_and_std_to_the_multiplied_statistics():
    """Eq. (1): the perturbed channel has mean delta_mu * mu(f) and std delta_sigma * sigma(f)."""
    torch.manual_seed(0)
    f = torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.3, -1.0, 2.0]).view(
        1, 3, 1, 1)
    d_mu, d_sigma = torch.tensor([1.5, 0.2, 1.0]), torch.tensor([0.5, 1.7, 1.0])
    out = AdvBN(relu=False).perturb(f, d_mu, d_sigma)
    dims = (0, 2, 3)
    assert torch.allclose(out.mean(dims), d_mu * f.mean(dims), atol=1e-5)
    assert torch.allclose(out.std(dims), d_sigma * f.std(dims), atol=1e-5)
    with_relu = AdvBN(relu=True).perturb(f, d_mu, d_sigma)
    assert torch.equal(with_relu, out.clamp_min(0))


def test_default_bound_is_m_tau_minus_0_1():
    assert AdvBN(steps=6, step_size=0.2).eps == pytest.approx(1.1)
    assert AdvBN(steps=3, step_size=0.2).eps == pytest.approx(0.5)
    assert AdvBN(steps=0).eps == 0.0
    with pytest.raises(ConfigError, match="method.eps"):
        AdvBN(eps=-0.5)


@pytest.mark.parametrize("eps", [0.3, 1.1])
def test_multipliers_stay_within_the_bound_and_reach_it(eps):
    model = _classifier()
    images, labels = _batch()
    f = _features(model, "features.6", images)
    advbn = AdvBN(steps=10, step_size=0.2, eps=eps)
    delta_mu, delta_sigma = advbn.attack(f, _rear_loss(model, "features.6", images, labels))
    for delta in (delta_mu, delta_sigma):
        assert delta.shape == (f.shape[1],)
        assert delta.min() >= 1 - eps - 1e-6 and delta.max() <= 1 + eps + 1e-6
    both = torch.cat([delta_mu, delta_sigma])
    # 10 steps of 0.2 exceed the bound: sign ascent pushes most entries onto it
    assert ((both - 1).abs() > eps - 1e-6).float().mean() > 0.5


def test_zero_steps_is_the_identity():
    model = _classifier()
    images, labels = _batch()
    f = _features(model, "features.6", images)  # post-ReLU, max-pooled: non-negative
    advbn = AdvBN(steps=0)
    delta_mu, delta_sigma = advbn.attack(f, _rear_loss(model, "features.6", images, labels))
    assert torch.equal(delta_mu, torch.ones(8)) and torch.equal(delta_sigma, torch.ones(8))
    assert torch.allclose(advbn.perturb(f, delta_mu, delta_sigma), f, atol=1e-6)
    signed = torch.randn(4, 3, 6, 6) + 0.5
    assert torch.allclose(AdvBN(steps=0, relu=False)(signed), signed, atol=1e-6)


def test_zero_steps_makes_the_adversarial_path_equal_the_clean_one():
    """With m = 0 and the auxiliary BNs fresh copies of the main ones, eq. (3)'s two terms are equal."""
    model = _classifier()
    method = AdvBNTraining("features.6", steps=0)
    method.setup(model, CPU)
    model.train()
    _, logs = method.training_step(model, *_batch())
    assert logs["ce_adv"] == pytest.approx(logs["ce_clean"], rel=1e-5)
    assert logs["delta_mu_dev"] == 0 and logs["delta_sigma_dev"] == 0


def test_pgd_on_the_multipliers_raises_the_loss_on_a_fixed_batch():
    images, labels = _batch()
    model = _fitted_classifier(images, labels)
    f = _features(model, "features.6", images)
    loss = _rear_loss(model, "features.6", images, labels)
    advbn = AdvBN(steps=6, step_size=0.2)
    with torch.no_grad():
        clean = loss(advbn(f)).item()
        ones = advbn.multipliers(f)
        adversarial = loss(advbn.perturb(f, *advbn.attack(f, loss))).item()
        one_step = loss(advbn.perturb(f, *AdvBN(steps=1, step_size=0.2).attack(f, loss))).item()
        assert torch.equal(ones[0], torch.ones(8))
    assert clean < 0.3  # the batch is fitted
    assert adversarial > one_step > clean
    assert adversarial > 3 * clean


# ---------------------------------------------------------------------------- dual BN
def test_converted_model_on_main_bns_equals_the_original():
    original = trained_like_cnn()
    converted = copy.deepcopy(original)
    names = convert_to_dual_bn(converted)
    assert names == ["features.1", "features.4", "features.8", "features.11"]
    assert all(isinstance(converted.get_submodule(n), DualBatchNorm) for n in names)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), original.eval()(x))
        assert torch.equal(converted.train()(x), original.train()(x))  # batch statistics, and the same update
    for (name, a), (_, b) in zip(original.named_buffers(), [(n, v) for n, v in converted.named_buffers()
                                                              if ".aux." not in n]):
        assert torch.equal(a, b), name
    # the auxiliary branch starts as a copy; changing it leaves the main branch alone
    converted.eval(), original.eval()
    with torch.no_grad():
        for _, layer in dual_bn_layers(converted):
            layer.aux.running_mean += 1.0
        main_out = converted(x)
        with bn_branch(converted, "aux"):
            aux_out = converted(x)
    assert torch.equal(main_out, original(x)) and not torch.allclose(aux_out, main_out)
    assert all(layer.active == "main" for _, layer in dual_bn_layers(converted))  # restored


def test_running_statistics_move_only_on_the_active_branch():
    net = trained_like_cnn()
    convert_to_dual_bn(net)
    layer = net.get_submodule("features.8")
    main_before, aux_before = layer.main.running_mean.clone(), layer.aux.running_mean.clone()
    net.train()
    with torch.no_grad(), bn_branch(net, "aux"):
        net(torch.rand(16, 1, 28, 28) + 1.0)
    assert torch.equal(layer.main.running_mean, main_before) and not torch.equal(layer.aux.running_mean, aux_before)


def test_fine_tuned_state_dict_loads_into_a_fresh_model():
    tuned = _classifier()
    AdvBNTraining("features.6").setup(tuned, CPU)
    state = tuned.net.state_dict()
    assert "features.8.aux.running_mean" in state and "features.1.running_mean" in state
    fresh = trained_like_cnn(seed=1)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)
    assert prepare_for_state_dict(fresh, state) == ["features.8", "features.11"]
    fresh.load_state_dict(state)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), tuned.net.eval()(x))


def test_torchvision_resnet18_conversion_after_layer1():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    model = NormalizedClassifier(net, mean=[0.5] * 3, std=[0.25] * 3)
    original = copy.deepcopy(model).eval()
    method = AdvBNTraining("layer1", eval_bn="both")
    method.setup(model, CPU)
    expected = {n for n, m in original.net.named_modules() if isinstance(m, nn.BatchNorm2d)
                and n.split(".")[0] in ("layer2", "layer3", "layer4")}
    assert set(method.converted) == expected and len(expected) == 15  # per stage: 2 blocks x 2 BNs + 1 downsample BN
    assert not isinstance(model.net.bn1, DualBatchNorm) and not isinstance(model.net.layer1[0].bn1, DualBatchNorm)
    frozen = {n for n, p in model.net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in original.net.named_parameters() if n.startswith(("conv1", "bn1", "layer1"))}
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original(x))
    model.train()
    loss, logs = method.training_step(model, x, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is None for n, p in model.net.named_parameters() if n in frozen)
    assert model.net.layer2[0].conv1.weight.grad is not None
    assert set(method.evaluation_modes(model)) == {"bn_main", "bn_aux"}


def test_timm_resnet_split_after_a_stage():
    import timm

    net = timm.create_model("resnet18", num_classes=10, in_chans=3)
    model = NormalizedClassifier(net, mean=[0.5] * 3, std=[0.25] * 3)
    method = AdvBNTraining("layer2")
    method.setup(model, CPU)
    assert all(n.startswith(("layer3", "layer4")) for n in method.converted) and method.converted
    model.train()
    loss, _ = method.training_step(model, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------- the split and the frozen front
def test_unknown_layer_names_the_option_and_lists_valid_names():
    with pytest.raises(ConfigError, match=r"method.layer='feature.6'.*features\.6.*Valid names.*'fc'"):
        AdvBNTraining("feature.6").setup(_classifier(), CPU)
    with pytest.raises(ConfigError, match="no trainable parameter comes after it"):
        AdvBNTraining("fc").setup(_classifier(), CPU)
    with pytest.raises(ConfigError, match="method.eval_bn"):
        AdvBNTraining("features.6", eval_bn="auxiliary")


def test_split_follows_registration_order():
    _, front, rear = split_network(trained_like_cnn(), "features.6")
    assert [n for n, _ in front] == [f"features.{i}" for i in range(7)]
    assert [n for n, _ in rear] == [*(f"features.{i}" for i in range(7, 14)), "pool", "fc"]


class _OutOfOrder(nn.Module):
    """``head`` is registered before ``body`` but runs after it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.body = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


def test_execution_order_differing_from_registration_is_an_error():
    batch = torch.rand(8, 1, 2, 3), torch.randint(0, 3, (8,))
    for layer, message in [("head", r"trained modules that run before it: \['body.0', 'body.1.main'\]"),
                           ("body.0", r"frozen modules that run after it: \['head'\]")]:
        model = NormalizedClassifier(_OutOfOrder(), mean=[0.0], std=[1.0])
        method = AdvBNTraining(layer, relu=False)
        method.setup(model, CPU)
        model.train()
        with pytest.raises(ConfigError, match=message):
            method.training_step(model, *batch)


def test_fine_tuning_changes_only_parameters_after_the_layer(tmp_path):
    """Through the real trainer (which calls model.train() every epoch): the front's parameters
    AND buffers (BN running statistics) are bit-for-bit unchanged; the rear's have moved."""
    model = _classifier()
    method = AdvBNTraining("features.6", eval_bn="both")
    images, labels = _batch(n=64)
    front_before = {k: v.clone() for k, v in model.net.features[:7].state_dict().items()}
    rear_before = {k: v.clone() for k, v in model.net.state_dict().items() if not k.startswith(
        tuple(f"features.{i}." for i in range(7)))}
    trainer = Trainer(epochs=2, batch_size=16, optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    trainer.fit(model, method, TensorDataset(images, labels),
                TrainContext(run_dir=tmp_path, device=CPU, seed=0, progress=False))
    for key, value in model.net.features[:7].state_dict().items():
        assert torch.equal(value, front_before[key]), key
    after = model.net.state_dict()
    for key in ("features.7.weight", "features.8.main.weight", "features.8.main.running_mean",
                "features.8.aux.running_mean", "features.11.aux.weight", "fc.weight"):
        before = rear_before[key.replace(".main", "").replace(".aux", "")]
        assert not torch.equal(after[key], before), key
    # the auxiliary BNs learned something of their own
    assert not torch.equal(after["features.8.aux.running_mean"], after["features.8.main.running_mean"])
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_attack_passes_do_not_move_auxiliary_statistics():
    model = _classifier()
    method = AdvBNTraining("features.6", steps=0)
    method.setup(model, CPU)
    other = _classifier()
    method6 = AdvBNTraining("features.6", steps=6)
    method6.setup(other, CPU)
    model.train(), other.train()
    batch = _batch()
    counters = [m.net.features[8].branch(b).num_batches_tracked.item() for m in (model, other) for b in ("main", "aux")]
    method.training_step(model, *batch)
    method6.training_step(other, *batch)
    # one BN update per branch and step (the clean pass, the final adversarial pass), however many attack passes
    after = [m.net.features[8].branch(b).num_batches_tracked.item() for m in (model, other) for b in ("main", "aux")]
    assert [a - c for a, c in zip(after, counters)] == [1, 1, 1, 1]


def _record_attack_losses(method):
    """Wrap ``method.advbn.attack`` so that every loss it evaluates is recorded (with the model's
    buffers at the attack's start and the training flags seen inside)."""
    record = {"losses": []}
    original = method.advbn.attack

    def attack(features, loss_of_features):
        def recorded(f_adv):
            loss = loss_of_features(f_adv)
            record["losses"].append(loss.item())
            return loss
        return original(features, recorded)

    method.advbn.attack = attack
    return record


def _aux_loss(model, method, images, labels, training):
    """CE of the unperturbed batch through the auxiliary BNs, the rear in train or eval mode (the
    frozen front always in eval mode), leaving every buffer as it was."""
    from robustexp.methods.advbn import frozen_running_stats

    model.train(training)
    method._freeze_front_mode()
    with bn_branch(model, "aux"), frozen_running_stats(model.modules()), torch.no_grad():
        loss = F.cross_entropy(model(images), labels).item()
    model.train()
    method._freeze_front_mode()
    return loss


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_attack_bn_mode_sets_the_statistics_the_attack_sees(mode):
    """``attack_bn_mode: eval`` (default; the authors' ``model.eval()`` in ``perturb``): the attack's
    first loss, at multipliers 1 (f_adv = ReLU(f) = f), is the eval-mode loss through the auxiliary
    BNs' running statistics; ``train``: the loss with batch statistics. The two differ here (running
    statistics of the trained-like CNN differ from the batch's)."""
    model = _classifier()
    method = AdvBNTraining("features.6", steps=2, attack_bn_mode=mode)
    assert method.attack_bn_mode == mode
    method.setup(model, CPU)
    images, labels = _batch()
    model.train()
    eval_loss = _aux_loss(model, method, images, labels, training=False)
    train_loss = _aux_loss(model, method, images, labels, training=True)
    assert abs(eval_loss - train_loss) > 1e-3
    record = _record_attack_losses(method)
    method.training_step(model, images, labels)
    assert len(record["losses"]) == 2
    assert record["losses"][0] == pytest.approx(eval_loss if mode == "eval" else train_loss, rel=1e-5)
    # the modes are back: the sub-network trains in train mode, the frozen front stays in eval mode
    assert model.training and model.net.features[8].aux.training
    assert not any(m.training for m in method.front)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_attack_leaves_no_trace_in_any_buffer(mode):
    """Inside :func:`attack_bn_context` forward passes in train mode and an attack leave every buffer
    as it was; in a training step the auxiliary running mean moves exactly once, by the momentum
    update with the final adversarial pass' batch mean (Algorithm 1's theta update), however many
    attack passes ran."""
    from robustexp.methods.advbn import attack_bn_context

    model = _classifier()
    method = AdvBNTraining("features.6", steps=6, attack_bn_mode=mode)
    method.setup(model, CPU)
    images, labels = _batch()
    model.train()
    method._freeze_front_mode()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    with bn_branch(model, "aux"), attack_bn_context(model, mode):
        features = _features(model, "features.6", images)
        method.advbn.attack(features, _rear_loss(model, "features.6", images, labels))
        model(images)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())

    aux = model.net.features[8].aux
    inputs = []
    handle = aux.register_forward_hook(lambda m, i, o: inputs.append((m.training, i[0].detach())))
    start = aux.running_mean.clone()
    method.training_step(model, images, labels)
    handle.remove()
    assert [training for training, _ in inputs] == [mode == "train"] * 6 + [True]
    final = inputs[-1][1]
    expected = (1 - aux.momentum) * start + aux.momentum * final.mean(dim=(0, 2, 3))
    assert torch.allclose(aux.running_mean, expected, atol=1e-6)


def test_attack_bn_mode_option_and_its_default():
    cfg = compose_config(["+method=advbn"])
    assert cfg.method.attack_bn_mode == "eval"
    assert compose_config(["+method=pgd_aux_bn"]).method.attack_bn_mode == "train"
    with pytest.raises(ConfigError, match="method.attack_bn_mode='batch'"):
        AdvBNTraining("features.6", attack_bn_mode="batch")
    with pytest.raises(ConfigError, match="method.attack_bn_mode"):
        PGDAuxBNTraining(attack_bn_mode="running")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_pgd_aux_bn_attack_bn_mode(mode):
    """The baseline's PGD passes: eval mode restores the modules' modes and, like train mode, leaves
    every buffer as it was; the attack still raises the loss."""
    model = _classifier()
    method = PGDAuxBNTraining(eps_linf=8 / 255, steps=3, attack_bn_mode=mode)
    method.setup(model, CPU)
    model.train()
    images, labels = _batch()
    seen = []
    handle = model.net.features[1].aux.register_forward_hook(lambda m, i, o: seen.append(m.training))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bn_branch(model, "aux"):
        adversarial = method.adversarial_images(model, images, labels)
    handle.remove()
    assert seen and set(seen) == {mode == "train"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.training and model.net.features[1].aux.training
    assert (adversarial - images).abs().max() <= 8 / 255 + 1e-6


# ---------------------------------------------------------------------------- PGD baseline
def test_pgd_aux_bn_baseline_converts_every_bn_and_its_attack_raises_the_loss():
    model = _classifier()
    method = PGDAuxBNTraining(eps_linf=8 / 255, steps=7)
    assert method.step_size == pytest.approx(2.5 * (8 / 255) / 7)
    method.setup(model, CPU)
    assert len(dual_bn_layers(model)) == 4
    model.train()
    images, labels = _batch()
    with bn_branch(model, "aux"):
        adversarial = method.adversarial_images(model, images, labels)
        with torch.no_grad():
            clean_loss = F.cross_entropy(model(images), labels).item()
            adv_loss = F.cross_entropy(model(adversarial), labels).item()
    assert (adversarial - images).abs().max() <= 8 / 255 + 1e-6
    assert adv_loss > clean_loss
    loss, logs = method.training_step(model, images, labels)
    assert logs["ce_adv"] > logs["ce_clean"] and torch.isfinite(loss)


# ---------------------------------------------------------------------------- end to end
def test_toy_run_fine_tunes_and_evaluates_both_bn_branches(tmp_path):
    from robustexp.main import run

    base = run(compose_config(["trainer.epochs=1", "~eval.evaluators.corruptions", "~eval.evaluators.eps_star"]),
               tmp_path / "standard")
    checkpoint = tmp_path / "standard" / "checkpoints" / "model_final.pt"
    cfg = compose_config(["+method=advbn", "trainer=finetune", "trainer.epochs=2", "trainer.batch_size=50",
                          "trainer.optimizer.lr=0.01", f"model.checkpoint={checkpoint}", "method.eval_bn=both",
                          "method.steps=2", "eval=feature_divergence", "~eval.evaluators.eps_star"])
    metrics = run(cfg, tmp_path / "advbn")
    assert metrics["status"] == "complete" and base["status"] == "complete"
    summary = metrics["summary"]
    for mode in ("bn_main", "bn_aux"):
        assert {f"clean_top1@{mode}", f"mCA@{mode}", f"fdiv_mean@{mode}"} <= set(summary)
        assert set(metrics[f"feature_divergence@{mode}"]["layers"]) == {"features.8", "features.11"}
    assert "clean_top1" not in summary
    assert (tmp_path / "advbn" / "feature_divergence_bn-main.png").is_file()
    assert (tmp_path / "advbn" / "feature_divergence_bn-aux.csv").is_file()
    assert "ce_adv" in metrics["train"]["final"]
    # through the whole runner (checkpoint loading, trainer, resume-ready checkpoints): the front of the
    # fine-tuned model is the standard model's, bit for bit, and the rear has moved
    start = torch.load(checkpoint, weights_only=True)
    tuned = torch.load(tmp_path / "advbn" / "checkpoints" / "model_final.pt", weights_only=True)
    for key in ("net.features.0.weight", "net.features.1.weight", "net.features.1.running_var",
                "net.features.3.weight"):
        assert torch.equal(tuned[key], start[key]), key
    assert not torch.equal(tuned["net.features.7.weight"], start["net.features.7.weight"])
    assert not torch.equal(tuned["net.features.8.aux.running_mean"], start["net.features.8.running_mean"])
