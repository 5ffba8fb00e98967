"""Tent: fully test-time adaptation by entropy minimization (Wang et al., ICLR 2021, arXiv 2006.10726).

Objective (the paper's Sec. 3, averaged over the test batch): the Shannon entropy of the model's
softmax prediction,

    H(y_hat) = - sum_c p(y_c) log p(y_c),      p = softmax(f_theta(x)),

is minimized over the batch, ``L = mean_i H(y_hat_i)``, by a few gradient steps on every test batch.

What is used, as in the official implementation (github.com/DequanWang/tent, ``tent.py``):

* **statistics**: every BatchNorm layer (any ``torch.nn.modules.batchnorm._BatchNorm``, affine or
  not) normalizes with the mean and biased variance of the current test batch (the statistics
  of train-mode BN; the same forward pass as ``BatchNormAdaptation(mode="prior",
  prior_strength=0)``). The gradient flows through these batch statistics, as in the official
  code, where BN runs in train mode with ``running_mean = running_var = None``. Here the layer's
  running buffers are set aside for the duration of its forward pass only (forward pre-hook,
  put back by a forward hook), so they are never updated and the state dict is untouched.
* **parameters**: only the affine scale and shift (``weight``, ``bias``) of every BatchNorm layer
  with ``affine=True`` are optimized; every other parameter has ``requires_grad=False`` while the
  adaptation is attached (the flags are restored by :meth:`TentAdaptation.detach`).
* **update**: ``steps`` steps of SGD (momentum, Nesterov as in the official ``conf.py``) or Adam
  (betas (0.9, 0.999)) per batch. The logits returned for a batch are those of the last forward
  pass before the last update (the official ``forward_and_adapt``): with ``steps=1``, the
  prediction with the parameters adapted on the *previous* batches, before this batch's update.
* **episodic**: parameters and optimizer state go back to their attach-time values after every
  batch; otherwise adaptation is continual within a subset (one corruption at one severity) and
  :meth:`TentAdaptation.reset`, called by the evaluators before and after every subset, restores
  them, so nothing leaks from one subset to the next.

Paper settings: ImageNet, SGD lr 0.00025, momentum 0.9, batch size 64; CIFAR-10/100, Adam
lr 1e-3, batch size 128. One deviation: the official code calls ``model.train()``, which also
turns on dropout; here the model stays in eval mode and only BN uses batch statistics (identical
for the ResNets of the paper, which have no dropout).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from robustexp.adaptation.base import TestTimeAdaptation
from robustexp.adaptation.bn import batchnorm_layers
from robustexp.errors import ConfigError
from robustexp.losses import softmax_entropy

OPTIMIZERS = ("sgd", "adam")
_STAT_BUFFERS = ("running_mean", "running_var")


class TentAdaptation(TestTimeAdaptation):
    """Tent test-time adaptation (entropy minimization over the BN affine parameters).

    Args:
        optimizer: ``adam`` or ``sgd``.
        lr: learning rate (paper: 1e-3 with Adam on CIFAR, 0.00025 with SGD on ImageNet).
        momentum: SGD momentum (paper 0.9); not used by Adam, whose betas are (``beta1``, 0.999).
        weight_decay: L2 penalty of the optimizer (paper 0).
        nesterov: Nesterov momentum for SGD (the official code's default); ignored when momentum is 0.
        beta1: Adam's first beta (official default 0.9).
        steps: optimization steps per test batch (>= 1).
        episodic: reset parameters and optimizer state after every batch.
        batch_size: n, images per test batch (the evaluators use it as their batch size; None: theirs).
    """

    updates_weights = True  # an entropy-minimization step on every batch: batches depend on the ones before

    def __init__(self, optimizer: str = "adam", lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = True, beta1: float = 0.9, steps: int = 1, episodic: bool = False,
                 batch_size: int | None = None):
        name = str(optimizer).lower()
        if name not in OPTIMIZERS:
            raise ConfigError(f"tent optimizer={optimizer!r}; expected one of {OPTIMIZERS}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"tent lr={lr!r}; expected a learning rate > 0")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ConfigError(f"tent momentum={momentum!r}; expected a value in [0, 1)")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ConfigError(f"tent weight_decay={weight_decay!r}; expected a value >= 0")
        if isinstance(beta1, bool) or not isinstance(beta1, (int, float)) or not 0 <= beta1 < 1:
            raise ConfigError(f"tent beta1={beta1!r}; expected a value in [0, 1)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"tent steps={steps!r}; expected an integer >= 1 (optimization steps per batch)")
        if not isinstance(episodic, bool):
            raise ConfigError(f"tent episodic={episodic!r}; expected true or false")
        if not isinstance(nesterov, bool):
            raise ConfigError(f"tent nesterov={nesterov!r}; expected true or false")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ConfigError(f"tent batch_size={batch_size!r}; expected an integer >= 1 or null")
        self.optimizer_name, self.lr, self.momentum, self.weight_decay = name, float(lr), float(momentum), \
            float(weight_decay)
        self.nesterov, self.beta1 = nesterov, float(beta1)
        self.steps, self.episodic, self.batch_size = steps, episodic, batch_size
        self.optimizer: torch.optim.Optimizer | None = None
        self.parameter_names: list[str] = []
        self._model: nn.Module | None = None
        self._layers: list[tuple[str, _BatchNorm]] = []
        self._params: list[nn.Parameter] = []
        self._initial_params: list[torch.Tensor] = []
        self._initial_grads: list[torch.Tensor | None] = []
        self._initial_buffers: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._optimizer_state: dict | None = None
        self._stashed: dict[int, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}
        self._hooks = []

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module) -> TentAdaptation:
        if self._model is not None:
            raise RuntimeError("this adaptation is already attached to a model")
        layers = batchnorm_layers(model)
        if not layers:
            raise ConfigError(f"Tent needs BatchNorm layers (it optimizes their affine parameters); "
                              f"{type(model).__name__} has none")
        params, names, seen = [], [], set()
        for layer_name, layer in layers:
            if not layer.affine:
                continue
            for pname in ("weight", "bias"):
                p = getattr(layer, pname)
                if isinstance(p, nn.Parameter) and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
                    names.append(f"{layer_name}.{pname}" if layer_name else pname)
        if not params:
            raise ConfigError(f"Tent optimizes the affine parameters of BatchNorm layers; none of the "
                              f"{len(layers)} BatchNorm layers of {type(model).__name__} has affine=True")
        self._model, self._layers, self._params, self.parameter_names = model, layers, params, names
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self._initial_params = [p.detach().clone() for p in params]
        self._initial_grads = [p.grad for p in params]
        self._initial_buffers = [(layer, key, buf.detach().clone()) for _, layer in layers
                                 for key, buf in layer.named_buffers(recurse=False) if buf is not None]
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        self.optimizer = self._make_optimizer()
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        for _, layer in layers:
            self._hooks.append(layer.register_forward_pre_hook(self._use_batch_statistics))
            self._hooks.append(layer.register_forward_hook(self._put_back_statistics, always_call=True))
        return self

    def detach(self) -> None:
        """Restore parameters, buffers, gradients and requires_grad flags; remove the hooks."""
        if self._model is None:
            return
        self.reset()
        for hook in self._hooks:
            hook.remove()
        for p, grad in zip(self._params, self._initial_grads):
            p.grad = grad
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._hooks, self._layers, self._params, self._requires_grad = [], [], [], []
        self._initial_params, self._initial_grads, self._initial_buffers = [], [], []
        self._model, self.optimizer, self._optimizer_state, self._stashed = None, None, None, {}

    def reset(self) -> None:
        """Back to the attach-time parameters, BN buffers and optimizer state (before every subset)."""
        if self._model is None:
            return
        with torch.no_grad():
            for p, initial in zip(self._params, self._initial_params):
                p.copy_(initial)
                p.grad = None
            for layer, key, initial in self._initial_buffers:
                getattr(layer, key).copy_(initial)
        self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self._params, lr=self.lr, momentum=self.momentum, dampening=0.0,
                                   weight_decay=self.weight_decay, nesterov=self.nesterov and self.momentum > 0)
        return torch.optim.Adam(self._params, lr=self.lr, betas=(self.beta1, 0.999), weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ batch statistics
    def _use_batch_statistics(self, layer: _BatchNorm, inputs):
        # with no running statistics, an eval-mode BN layer normalizes with the batch's own (and
        # backpropagates through them), exactly as in train mode, and updates nothing
        self._stashed.setdefault(id(layer), []).append(tuple(layer._buffers.get(k) for k in _STAT_BUFFERS))
        for key in _STAT_BUFFERS:
            layer._buffers[key] = None

    def _put_back_statistics(self, layer: _BatchNorm, inputs, output):
        stack = self._stashed.get(id(layer))
        if stack:
            for key, buf in zip(_STAT_BUFFERS, stack.pop()):
                layer._buffers[key] = buf

    # ------------------------------------------------------------------ prediction
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits for ``images`` (those of the forward pass before the batch's last update), after
        ``steps`` entropy-minimization steps on this batch."""
        if self._model is None:
            raise RuntimeError("TentAdaptation.predict called before attach(model)")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Tent takes gradient steps at test time; it cannot run under torch.inference_mode()")
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    logits = model(images)
                    loss = softmax_entropy(logits).mean(0)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        finally:
            if self.episodic:
                self.reset()
        return logits.detach()

    def label(self) -> str:
        return f"tent-{self.optimizer_name}-lr{self.lr:g}-steps{self.steps}" + ("-episodic" if self.episodic else "")

    def describe(self) -> str:
        if self.optimizer_name == "sgd":
            nesterov = " nesterov" if self.nesterov and self.momentum else ""
            opt = f"SGD lr={self.lr:g} momentum={self.momentum:g}{nesterov}"
        else:
            opt = f"Adam lr={self.lr:g} betas=({self.beta1:g}, 0.999)"
        if self.weight_decay:
            opt += f" weight_decay={self.weight_decay:g}"
        affine = sum(1 for _, layer in self._layers if layer.affine)
        what = (f"weight and bias of {affine} affine BN layers ({sum(p.numel() for p in self._params)} values)"
                if self._params else "weight and bias of the affine BN layers")
        return (f"Tent (entropy minimization), {opt}, {self.steps} step(s) per batch, n={self.batch_size}, "
                f"{'episodic (reset after every batch)' if self.episodic else 'continual within each subset'}; "
                f"optimizes the {what}, BN normalizes with test-batch statistics")
