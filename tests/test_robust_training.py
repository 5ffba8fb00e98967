"""PGD adversarial training, TRADES and RSE: the attacks, the loss terms and the noisy ensemble."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustexp.errors import ConfigError
from robustexp.losses import trades_kl
from robustexp.methods.adversarial_training import TRADES, PGDAdversarialTraining
from robustexp.methods.rse import NoisyEnsemble, RandomSelfEnsemble

EPS = 8 / 255


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 100, 4))


def _batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 12, 12, generator=g)
    images[:4] = (images[:4] > 0.5).float()        # saturated pixels: the box constraint is active
    return images, torch.randint(4, (n,), generator=g)


def test_pgd_examples_stay_in_the_ball_and_the_box_and_raise_the_loss():
    model, (images, labels) = _model(), _batch()
    model.train()
    running_mean = model[1].running_mean.clone()
    torch.manual_seed(0)
    adversarial = PGDAdversarialTraining(eps=EPS, steps=7).adversarial_examples(model, images, labels)
    assert (adversarial - images).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert model.training                                       # train mode restored after the attack
    assert torch.equal(model[1].running_mean, running_mean)     # the attack ran in eval mode: BN untouched
    model.eval()
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(images), labels, reduction="none")
        adversarial_loss = F.cross_entropy(model(adversarial), labels, reduction="none")
    assert (adversarial_loss >= clean_loss - 1e-6).all() and adversarial_loss.mean() > clean_loss.mean() + 0.01


def test_pgd_training_loss_is_cross_entropy_on_the_adversarial_batch():
    model, (images, labels) = _model(), _batch()
    method = PGDAdversarialTraining(eps=EPS, steps=3)
    assert method.step_size == pytest.approx(2.5 * EPS / 3)
    replay = copy.deepcopy(model)       # the training step's forward pass updates BN running statistics
    torch.manual_seed(4)
    loss, _ = method.training_step(model, images, labels)
    model = replay
    torch.manual_seed(4)
    adversarial = method.adversarial_examples(model, images, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(model(adversarial), labels).item(), rel=1e-5)


def test_trades_kl_equals_a_hand_computation():
    clean, adversarial = [1.0, 0.0, -1.0], [0.0, 0.5, 0.2]
    p = [math.exp(v) / sum(math.exp(u) for u in clean) for v in clean]
    q = [math.exp(v) / sum(math.exp(u) for u in adversarial) for v in adversarial]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))       # KL(p(x) || p(x'))
    assert trades_kl(torch.tensor([clean]), torch.tensor([adversarial])).item() == pytest.approx(expected, rel=1e-6)
    assert trades_kl(torch.tensor([clean]), torch.tensor([clean])).item() == pytest.approx(0.0, abs=1e-7)


def test_trades_attack_stays_in_the_ball_and_raises_the_kl():
    model, (images, _) = _model(), _batch()
    model.train()
    torch.manual_seed(0)
    adversarial = TRADES(eps=EPS, steps=7).adversarial_examples(model, images)
    assert model.training
    assert (adversarial - images).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - images).abs().amax(dim=(1, 2, 3)).min() > EPS / 2  # it moved (the KL gradient is 0 at x)
    model.eval()
    with torch.no_grad():
        kl = trades_kl(model(images), model(adversarial))
        random = trades_kl(model(images), model((images + EPS * torch.randn_like(images).sign()).clamp(0, 1)))
    assert kl.mean() > 2 * random.mean()


def test_trades_loss_is_clean_ce_plus_beta_kl():
    model, (images, labels) = _model(), _batch()
    method = TRADES(beta=3.0, eps=EPS, steps=2)
    replay = copy.deepcopy(model)
    torch.manual_seed(5)
    loss, logs = method.training_step(model, images, labels)
    model = replay
    torch.manual_seed(5)
    adversarial = method.adversarial_examples(model, images)
    clean_logits, adversarial_logits = model(images), model(adversarial)
    expected = F.cross_entropy(clean_logits, labels) + 3.0 * trades_kl(clean_logits, adversarial_logits).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["kl"] > 0


def test_rse_ensemble_averages_noisy_softmax():
    model, (images, _) = _model(), _batch(n=5)
    model.eval()
    ensemble = NoisyEnsemble(model, sigma=0.1, ensemble_size=4, seed=3)
    with torch.no_grad():
        out = ensemble(images)
        g = torch.Generator().manual_seed(3)
        probs = torch.stack([F.softmax(model(images + 0.1 * torch.randn(images.shape, generator=g)), dim=1)
                             for _ in range(4)]).mean(0)
    assert torch.allclose(out, probs.log(), atol=1e-5)
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)          # log-probabilities
    single = NoisyEnsemble(model, sigma=0.0, ensemble_size=1)
    with torch.no_grad():
        assert torch.allclose(single(images), F.log_softmax(model(images), dim=1), atol=1e-6)


def test_rse_training_noise_and_evaluation_modes():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.flatten(1)[:, :3]

    images = torch.full((64, 1, 16, 16), 0.5)
    method = RandomSelfEnsemble(sigma=0.1, ensemble_size=3)
    method.training_step(Recorder(), images, torch.zeros(64, dtype=torch.long))
    residual = seen[0] - images
    assert residual.std().item() == pytest.approx(0.1, rel=0.05) and residual.abs().max() > 0.3  # not clipped
    model = _model()
    modes = method.evaluation_modes(model)
    assert set(modes) == {"", "single"}
    with modes[""]() as a, modes[""]() as b, modes["single"]() as plain:
        assert isinstance(a, NoisyEnsemble) and plain is model
        with torch.no_grad():
            x = torch.rand(4, 1, 12, 12)
            assert torch.equal(a.eval()(x), b.eval()(x))   # seeded: reproducible evaluations
    assert set(RandomSelfEnsemble(evaluate_single=False).evaluation_modes(model)) == {""}


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="method.eps"):
        PGDAdversarialTraining(eps=0)
    with pytest.raises(ConfigError, match="norm='l1'"):
        TRADES(norm="l1")
    with pytest.raises(ConfigError, match="method.beta"):
        TRADES(beta=-1)
    with pytest.raises(ConfigError, match="method.ensemble_size"):
        RandomSelfEnsemble(ensemble_size=0)
