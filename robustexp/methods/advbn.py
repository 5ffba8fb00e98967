"""Adversarial Batch Normalization (Shu et al. 2021) and its baseline, image-space PGD
adversarial training with auxiliary BN (both fine-tune a trained classifier; Sec. 4 and 5.1).

AdvBN (eqs. 1-3, Algorithm 1). The network ``g`` is split after a named module ``l``
(``method.layer``, relative to the network inside the normalization wrapper): the front
``g^{1,l}`` is frozen (parameters, and BN statistics: it stays in eval mode), the rear
``g^{l+1,L}`` is fine-tuned, its BN layers converted into main + auxiliary BNs
(:mod:`robustexp.models.dual_bn`). Each step, with ``f = g^{1,l}(x)``:

* clean path: ``CE(g^{l+1,L}(f), y)`` on the main BNs;
* adversarial path: per-channel multipliers ``delta_mu, delta_sigma`` (start at 1, no random
  start) take ``m`` sign-gradient ascent steps of size ``tau`` on
  ``CE(g^{l+1,L}(delta_sigma (f - mu(f)) + delta_mu mu(f)), y)`` through the auxiliary BNs and
  are clipped to ``[1 - eps, 1 + eps]`` (eq. 2; ``mu`` per channel over N, H, W); then
  ``CE(g^{l+1,L}(f_adv), y)`` on the auxiliary BNs;
* loss = the sum of both (eq. 3).

The paper's setting (from the authors' code, see SPEC): ``tau = 0.2``, ``m = 6``,
``eps = m tau - 0.1``, the perturbed features followed by a ReLU (the outputs of ResNet stages
and of the small CNN's pooling layers are post-ReLU; ``relu: false`` for a layer whose output is
signed). The split follows the order in which modules are registered (``named_modules``), which
is their execution order in ResNets, the small CNN and most timm models; the first training step
checks it against the actual execution order and stops with an error if they differ.

BatchNorm mode of the attack (``attack_bn_mode``). Neither eq. (2) nor Algorithm 1 says which
statistics the BNs of ``g^{l+1,L}`` normalize with while the multipliers are optimized (Sec. 3's
"PGD steps on batch statistics" are the feature statistics ``mu(f)``, ``sigma(f)`` of eq. 1,
computed from the batch in either mode). The
authors' code (``perturb`` in ``train_imagenet.py`` of github.com/azshue/AdvBN) calls
``model.eval()`` for the ``m`` attack passes through the auxiliary ("adv") BNs and ``model.train()``
(front BNs kept in eval) before the training passes: the attack sees the auxiliary BNs' running
statistics, and the loss of eq. (3) / the ``theta`` update of Algorithm 1 is computed in train mode
(batch statistics, running statistics updated). ``attack_bn_mode: eval`` (the default) does the
same; ``train`` runs the attack passes with batch statistics instead. In both modes every buffer
of the model (running statistics, batch counters) is restored after the attack, so the running
statistics of the auxiliary BNs are updated by the final adversarial pass only, and those of the
main BNs by the clean pass only. During the attack the front part runs again in every pass
(without autograd: its parameters are frozen); its output is replaced by the perturbed copy of
the clean features.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from robustexp.attacks import pgd
from robustexp.errors import ConfigError
from robustexp.methods.base import TrainingMethod
from robustexp.models.dual_bn import BRANCHES, bn_branch, convert_to_dual_bn, dual_bn_layers
from robustexp.models.splitting import inner_network, split_network

log = logging.getLogger(__name__)

EVAL_BN = ("main", "aux", "both")
ATTACK_BN_MODES = ("eval", "train")


# ---------------------------------------------------------------------------- the layer
class AdvBN(nn.Module):
    """The AdvBN layer (eqs. 1-2): re-normalizes features with adversarial per-channel
    multipliers of their batch mean and standard deviation.

    ``perturb(f, delta_mu, delta_sigma) = delta_sigma * (f - mu(f)) + delta_mu * mu(f)`` (eq. 1
    with the two sigma(f) cancelled, as the paper notes under eq. 2), optionally followed by a
    ReLU; ``mu(f)`` is the mean over every axis but ``channel_dim``. ``attack`` finds the
    multipliers by PGD (Algorithm 1, inner loop). With ``steps = 0`` the multipliers stay 1 and
    the layer is the identity (up to the ReLU on signed features).
    """

    def __init__(self, steps: int = 6, step_size: float = 0.2, eps: float | None = None, relu: bool = True,
                 channel_dim: int = 1):
        steps = int(steps)
        if steps < 0 or step_size < 0:
            raise ConfigError(f"method.steps must be >= 0 and method.step_size >= 0, got {steps}, {step_size}")
        if eps is None:  # the paper's bound eps = m * tau - 0.1 (Sec. 5.2), 0 when there is no step
            eps = max(steps * step_size - 0.1, 0.0)
        if eps < 0:
            raise ConfigError(f"method.eps must be >= 0 (the multipliers stay in [1 - eps, 1 + eps]), got {eps}")
        super().__init__()
        self.steps, self.step_size, self.eps = steps, float(step_size), float(eps)
        self.relu, self.channel_dim = bool(relu), int(channel_dim)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, step_size={self.step_size}, eps={self.eps:g}, relu={self.relu}"

    def _check(self, features: torch.Tensor) -> None:
        if not torch.is_tensor(features) or features.dim() < 2 or not -features.dim() <= self.channel_dim \
                < features.dim():
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise ConfigError(f"AdvBN perturbs a feature tensor with channels at dim {self.channel_dim} "
                              f"(N, C, ...), got {shape}; insert it after another layer (method.layer) or set "
                              f"method.channel_dim")

    def _per_channel(self, delta: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        shape = [1] * features.dim()
        shape[self.channel_dim] = -1
        return delta.view(shape)

    def channel_mean(self, features: torch.Tensor) -> torch.Tensor:
        """mu(f): the mean of every channel over the batch and all other axes (keepdim)."""
        dim = self.channel_dim % features.dim()
        return features.mean(dim=[d for d in range(features.dim()) if d != dim], keepdim=True)

    def multipliers(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting point (1, 1) of the attack, one entry per channel."""
        channels = features.shape[self.channel_dim]
        ones = torch.ones(channels, device=features.device, dtype=features.dtype)
        return ones, ones.clone()

    def perturb(self, features: torch.Tensor, delta_mu: torch.Tensor, delta_sigma: torch.Tensor) -> torch.Tensor:
        """``delta_sigma (f - mu(f)) + delta_mu mu(f)`` per channel, then ReLU if ``relu``."""
        self._check(features)
        mu = self.channel_mean(features)
        out = self._per_channel(delta_sigma, features) * (features - mu) + self._per_channel(delta_mu, features) * mu
        return F.relu(out) if self.relu else out

    def forward(self, features: torch.Tensor, delta_mu: torch.Tensor | None = None,
                delta_sigma: torch.Tensor | None = None) -> torch.Tensor:
        ones = self.multipliers(features)
        return self.perturb(features, ones[0] if delta_mu is None else delta_mu,
                            ones[1] if delta_sigma is None else delta_sigma)

    def attack(self, features: torch.Tensor, loss_of_features: Callable[[torch.Tensor], torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1, inner loop: ``steps`` times ``delta <- clip(delta + tau sign(grad_delta L),
        1 - eps, 1 + eps)`` from ``delta = 1``, where ``L = loss_of_features(perturb(f, delta))``
        (a scalar). Only the multipliers get gradients. Returns ``(delta_mu, delta_sigma)``."""
        self._check(features)
        features = features.detach()
        delta_mu, delta_sigma = self.multipliers(features)
        for _ in range(self.steps):
            delta_mu.requires_grad_(True)
            delta_sigma.requires_grad_(True)
            with torch.enable_grad():
                loss = loss_of_features(self.perturb(features, delta_mu, delta_sigma))
                grad_mu, grad_sigma = torch.autograd.grad(loss, [delta_mu, delta_sigma])
            with torch.no_grad():
                delta_mu = (delta_mu + self.step_size * grad_mu.sign()).clamp(1 - self.eps, 1 + self.eps)
                delta_sigma = (delta_sigma + self.step_size * grad_sigma.sign()).clamp(1 - self.eps, 1 + self.eps)
        return delta_mu.detach(), delta_sigma.detach()


# ---------------------------------------------------------------------------- helpers of the split network
def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


@contextlib.contextmanager
def frozen_running_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore the buffers (BN running statistics, batch counters) of ``modules`` on exit: forward
    passes in train mode inside the block use batch statistics but leave no trace. Only buffers
    that changed are written back, so a buffer that an earlier eval-mode pass saved for backward
    (running statistics of a BN in eval mode) keeps its autograd version."""
    saved = [(buffer, buffer.detach().clone()) for m in modules for buffer in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


@contextlib.contextmanager
def module_modes(model: nn.Module, training: bool) -> Iterator[None]:
    """Every module of ``model`` in train (``training=True``) or eval mode inside the block; each
    module's own mode is restored on exit (a frozen front stays in eval mode afterwards)."""
    modules = list(model.modules())
    saved = [m.training for m in modules]
    for module in modules:
        module.training = training
    try:
        yield
    finally:
        for module, mode in zip(modules, saved):
            module.training = mode


def check_attack_bn_mode(mode: str) -> str:
    if mode not in ATTACK_BN_MODES:
        raise ConfigError(f"method.attack_bn_mode={mode!r}; expected one of {ATTACK_BN_MODES} (eval: the attack "
                          f"passes normalize with the BNs' running statistics, as the authors' code; train: with "
                          f"the batch statistics)")
    return mode


@contextlib.contextmanager
def attack_bn_context(model: nn.Module, mode: str) -> Iterator[None]:
    """The forward passes of an attack inside the block: in ``eval`` mode every module is in eval
    mode (BNs use their running statistics, as the authors' ``model.eval()`` before the attack), in
    ``train`` mode the modules keep their modes (BNs in train mode use batch statistics). Either
    way every buffer of ``model`` is restored on exit: the attack leaves no trace in the running
    statistics."""
    check_attack_bn_mode(mode)
    modes = module_modes(model, training=False) if mode == "eval" else contextlib.nullcontext()
    with modes, frozen_running_stats(model.modules()):
        yield


@contextlib.contextmanager
def _output_hook(module: nn.Module, hook: Callable) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


# ---------------------------------------------------------------------------- methods
class _AuxBNMethod(TrainingMethod):
    """Shared by AdvBN and PGD-aux-BN training: which BNs the trained model is evaluated with."""

    def __init__(self, eval_bn: str):
        if eval_bn not in EVAL_BN:
            raise ConfigError(f"method.eval_bn={eval_bn!r}; expected one of {EVAL_BN} (main: the BNs of clean "
                              f"features, aux: the auxiliary BNs of adversarial features, both: two evaluations)")
        self.eval_bn = eval_bn

    def aux_layers(self, model: nn.Module) -> list[nn.Module]:
        return [layer.aux for _, layer in dual_bn_layers(model)]

    def evaluation_modes(self, model: nn.Module):
        """``eval_bn: main | aux``: one evaluation under the plain metric names; ``both``: two, with
        metrics suffixed ``@bn_main`` and ``@bn_aux`` (the paper's Table 7)."""
        if self.eval_bn != "main" and not dual_bn_layers(model):
            raise ConfigError(f"method.eval_bn={self.eval_bn} needs auxiliary BNs, but the model has no converted "
                              f"BatchNorm layer")
        if self.eval_bn == "both":
            return {f"bn_{branch}": (lambda b=branch: bn_branch(model, b)) for branch in BRANCHES}
        return {"": lambda: bn_branch(model, self.eval_bn)}


class AdvBNTraining(_AuxBNMethod):
    """Fine-tuning with an AdvBN layer after ``layer`` (eq. 3, Algorithm 1; see the module doc).

    Args:
        layer: the module after which AdvBN acts, by its name in the network (``model.net``):
            ``layer1`` (conv2_3) for ResNets, ``features.6`` (after the first pooling) for the small CNN.
        steps, step_size, eps: PGD on the multipliers: ``m``, ``tau`` and the bound
            (null: ``m tau - 0.1``).
        relu: apply a ReLU to the perturbed features (for post-ReLU outputs such as ResNet stages).
        channel_dim: the channel axis of the layer's output (1 for (N, C, H, W)).
        eval_bn: ``main``, ``aux`` or ``both`` (see :meth:`evaluation_modes`).
        attack_bn_mode: ``eval`` (the BNs' running statistics during the ``m`` attack passes, as the
            authors' code) or ``train`` (batch statistics); see the module doc.
    """

    def __init__(self, layer: str, steps: int = 6, step_size: float = 0.2, eps: float | None = None,
                 relu: bool = True, channel_dim: int = 1, eval_bn: str = "main", attack_bn_mode: str = "eval"):
        super().__init__(eval_bn)
        self.attack_bn_mode = check_attack_bn_mode(attack_bn_mode)
        if not layer or str(layer) == "???":
            raise ConfigError("method.layer is required: the name of the module after which AdvBN acts "
                              "(e.g. layer1 for a ResNet, features.6 for the small CNN)")
        self.layer = str(layer)
        self.advbn = AdvBN(steps=steps, step_size=step_size, eps=eps, relu=relu, channel_dim=channel_dim)
        self.name = (f"AdvBN after {self.layer} (m={self.advbn.steps}, tau={self.advbn.step_size:g}, "
                     f"eps={self.advbn.eps:g}, attack with BNs in {self.attack_bn_mode} mode), auxiliary BN; "
                     f"evaluated with {eval_bn} BN")
        self._checked = False

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Split the network, freeze the front, convert the rear's BatchNorms into main + auxiliary."""
        net = inner_network(model)
        self.insertion, front, rear = split_network(net, self.layer, "method.layer")
        self.front = [m for _, m in front]
        self.front_names = [n for n, _ in front]
        self.rear_names = [n for n, _ in rear]
        layer_ancestors = [m for n, m in net.named_modules()
                           if n not in self.front_names and n not in self.rear_names]
        for module in self.front + layer_ancestors:
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)
        if not any(p.requires_grad for _, m in rear for p in m.parameters(recurse=False)):
            raise ConfigError(f"method.layer={self.layer!r}: no trainable parameter comes after it; choose an "
                              f"earlier layer (the rear part is what AdvBN fine-tunes)")
        from torch.nn.modules.batchnorm import _BatchNorm

        rear_bns = [n for n, m in rear if isinstance(m, _BatchNorm)]
        if not rear_bns:
            log.warning("AdvBN: no BatchNorm after %s; the adversarial path has no auxiliary BN", self.layer)
        self.converted = convert_to_dual_bn(net, rear_bns)
        self.rear_names = [n for n, _ in split_network(net, self.layer)[2]]  # with the new main / aux modules
        self._checked = False

    def _freeze_front_mode(self) -> None:
        """Keep the frozen front in eval mode (the trainer calls ``model.train()`` every epoch):
        its BN layers normalize with, and keep, their running statistics."""
        for module in self.front:
            module.training = False

    def _check_split(self, model: nn.Module, images: torch.Tensor) -> None:
        """Verify on one batch that every front module runs before the layer's output and every rear
        module after it (the split assumes registration order = execution order)."""
        net = inner_network(model)
        order: list[str] = []
        kinds = {**{n: "front" for n in self.front_names}, **{n: "rear" for n in self.rear_names}}
        handles = [m.register_forward_hook(lambda *_, n=n: order.append(n))
                   for n, m in net.named_modules() if n in kinds and _own_tensors(m)]
        handles.append(self.insertion.register_forward_hook(lambda *_: order.append("<advbn>")))
        try:
            with torch.no_grad(), frozen_running_stats(net.modules()):
                model(images)
        finally:
            for handle in handles:
                handle.remove()
        if order.count("<advbn>") != 1:
            raise ConfigError(f"method.layer={self.layer!r} runs {order.count('<advbn>')} times in one forward pass; "
                              f"AdvBN needs a module that runs exactly once")
        cut = order.index("<advbn>")
        late = sorted({n for n in order[cut + 1:] if kinds.get(n) == "front"})
        early = sorted({n for n in order[:cut] if kinds.get(n) == "rear"})
        if late or early:
            raise ConfigError(f"method.layer={self.layer!r}: the network does not run its modules in the order they "
                              f"are registered (frozen modules that run after it: {late}; trained modules that run "
                              f"before it: {early}); choose a layer at a stage boundary")

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        self._freeze_front_mode()
        if not self._checked:
            self._check_split(model, images)
            self._checked = True
        captured: list[torch.Tensor] = []

        def capture(module, inputs, output):
            captured.append(output.detach() if torch.is_tensor(output) else output)

        with bn_branch(model, "main"), _output_hook(self.insertion, capture):
            logits_clean = model(images)
        features = captured[0]
        self.advbn._check(features)

        def run_with(replacement: torch.Tensor) -> torch.Tensor:
            with _output_hook(self.insertion, lambda *_: replacement):
                return model(images)

        with bn_branch(model, "aux"):
            with attack_bn_context(model, self.attack_bn_mode):
                delta_mu, delta_sigma = self.advbn.attack(
                    features, lambda f_adv: F.cross_entropy(run_with(f_adv), labels))
            # eq. (3) / Algorithm 1's update: the adversarial path in the trainer's (train) mode
            logits_adv = run_with(self.advbn.perturb(features, delta_mu, delta_sigma))
        ce_clean, ce_adv = F.cross_entropy(logits_clean, labels), F.cross_entropy(logits_adv, labels)
        loss = ce_clean + ce_adv
        return loss, {"loss": loss.item(), "ce_clean": ce_clean.item(), "ce_adv": ce_adv.item(),
                      "acc": _accuracy(logits_clean, labels), "acc_adv": _accuracy(logits_adv, labels),
                      "delta_mu_dev": (delta_mu - 1).abs().mean().item(),
                      "delta_sigma_dev": (delta_sigma - 1).abs().mean().item()}


class PGDAuxBNTraining(_AuxBNMethod):
    """The paper's "Adv. Training" baseline (Sec. 5.1): fine-tuning on clean images with the main
    BNs and on image-space PGD adversarial examples with auxiliary BNs,
    ``CE(g(x), y) + CE(g_aux(x_adv), y)``, every BN of the network converted. ``x_adv``: L-inf PGD
    (Madry et al.) of radius ``eps_linf`` from a random start, ``steps`` steps of ``step_size``
    (null: ``2.5 eps / steps``), computed through the auxiliary BNs (their running statistics are
    updated by the training pass only). Pixels in [0, 1]; normalization is inside the model.

    ``attack_bn_mode``: ``train`` (default, as before this option: the auxiliary BNs normalize the
    attack passes with batch statistics; Sec. 5.1 does not say, and the authors released no code
    for this baseline) or ``eval`` (running statistics, as their AdvBN attack); every buffer is
    restored after the attack in both."""

    def __init__(self, eps_linf: float = 8 / 255, steps: int = 7, step_size: float | None = None,
                 random_init: bool = True, eval_bn: str = "main", attack_bn_mode: str = "train"):
        super().__init__(eval_bn)
        self.attack_bn_mode = check_attack_bn_mode(attack_bn_mode)
        if eps_linf < 0 or steps < 0:
            raise ConfigError(f"method.eps_linf and method.steps must be >= 0, got {eps_linf}, {steps}")
        self.eps_linf, self.steps = float(eps_linf), int(steps)
        self.step_size = 2.5 * self.eps_linf / max(self.steps, 1) if step_size is None else float(step_size)
        self.random_init = bool(random_init)
        self.name = (f"PGD adversarial training with auxiliary BN (L-inf eps {self.eps_linf:.4g}, {self.steps} "
                     f"steps of {self.step_size:.4g}); evaluated with {eval_bn} BN")

    def setup(self, model: nn.Module, device: torch.device) -> None:
        net = inner_network(model)
        if not dual_bn_layers(net):
            self.converted = convert_to_dual_bn(net)
        if not dual_bn_layers(net):
            raise ConfigError(f"method pgd_aux_bn needs BatchNorm layers; {type(net).__name__} has none")

    def adversarial_images(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L-inf PGD against the model on its auxiliary BNs (the caller switches the branch), with
        the BNs in ``attack_bn_mode``."""
        with attack_bn_context(model, self.attack_bn_mode):
            return pgd(lambda x, y: F.cross_entropy(model(x), y, reduction="none"), images, labels, norm="linf",
                       eps=self.eps_linf, step_size=self.step_size, steps=self.steps, random_init=self.random_init)

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        with bn_branch(model, "aux"):
            adversarial = self.adversarial_images(model, images, labels)
            logits_adv = model(adversarial)
        with bn_branch(model, "main"):
            logits_clean = model(images)
        ce_clean, ce_adv = F.cross_entropy(logits_clean, labels), F.cross_entropy(logits_adv, labels)
        loss = ce_clean + ce_adv
        return loss, {"loss": loss.item(), "ce_clean": ce_clean.item(), "ce_adv": ce_adv.item(),
                      "acc": _accuracy(logits_clean, labels), "acc_adv": _accuracy(logits_adv, labels)}
