"""Adversarial Noise Training (Rusak et al. 2020, Sec. 3.2, eqs. 2-3), and ANT+SIN.

A noise generator ``g_phi(z)``, z ~ N(0, I), produces noise that is projected onto the L2
sphere of radius ``eps_l2`` around the image with clipping-aware rescaling (footnote 3). Each
step: one generator step (Adam, maximize the classifier's cross-entropy on generator noise),
then one classifier step on a batch that is 50 % clean, 30 % perturbed by the current generator
and 20 % by generators replayed from earlier in training (states kept in a bounded in-memory
buffer, saved every ``replay_every`` steps). Every ``restart_every`` steps the generator is
replaced by a new one trained from scratch against the current classifier for ``restart_steps``
steps (on the current batch, with fresh z every step), to keep it out of local optima.

The classifier during a generator step (eq. 2 inside eq. 3): the generator maximizes the loss of the
current classifier f_theta, a fixed function of each image, and must not change it; only the
classifier's own step (on the mixed batch) updates the classifier. So generator steps run the
classifier in eval mode: BatchNorm normalizes with its running statistics and neither updates them
nor its batch counter, dropout is off, and gradients are taken with respect to the generator's
parameters only (no ``.grad`` is left on the classifier). In train mode the generator would instead
attack BN statistics of a batch that is all noise (a function that is neither the one evaluated nor
the one trained, which normalizes away any shift or scale the noise adds to a channel), and every
step, 100 per restart, would overwrite the running statistics with those of noise-only batches.

Several processes (torchrun, DDP): there is one generator for the whole run, as in a single process
with the global batch. Every rank initializes it from the same seed (rank 0's, broadcast at setup),
generator gradients are averaged over ranks after every generator step (so every rank takes the same
Adam step on the gradient of the global batch's loss), and the replayed state is chosen from a seed
shared by all ranks. The generator, its optimizer and the replay buffer are therefore identical on
all ranks; rank 0's copy is checkpointed, and a resumed run continues exactly. Only z (and the
images) differ between ranks, as they differ between the images of one batch. The classifier the
generator attacks is the same on all ranks too: its parameters are, and before every generator step
rank 0's BN running statistics are copied to the other ranks (the statistics the run keeps: the
trainer broadcasts rank 0's after every epoch, and checkpoints rank 0's; other ranks' own statistics
are used for nothing else, as their classifier steps normalize with batch statistics). This also
makes a run resumed from a mid-epoch checkpoint (rank 0's statistics on every rank) continue exactly.

ANT+SIN (Sec. 3.2, last paragraph): with ``mix_root`` (an ImageFolder tree with the dataset's class
folders, such as Stylized-ImageNet) and ``mix_fraction``, that share of every batch is replaced by
random images of the second source (resized to the batch's size, gray if the data is), which are
not perturbed; the paper's split is 25 % clean, 30 % stylized, 45 % generator noise.
"""

from __future__ import annotations

import copy
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from robustexp import distributed
from robustexp.errors import ConfigError
from robustexp.methods.base import TrainingMethod
from robustexp.models.noise_generator import NoiseGenerator, check_kernel, classifier_frozen
from robustexp.utils import derive_seed


class AdversarialNoiseTraining(TrainingMethod):
    """ANT with the batch split, replay buffer and restarts of Rusak et al. (see module doc)."""

    def __init__(self, eps_l2: float, kernel: str = "1x1", generator_lr: float = 1e-4, clean_fraction: float = 0.5,
                 current_fraction: float = 0.3, replay_every: int = 50, replay_size: int = 50,
                 restart_every: int = 1000, restart_steps: int = 100, mix_root: str | None = None,
                 mix_fraction: float = 0.0):
        if eps_l2 <= 0:
            raise ConfigError(f"method.eps_l2 must be positive, got {eps_l2}")
        if not (0 <= clean_fraction and 0 <= current_fraction and 0 <= mix_fraction
                and clean_fraction + mix_fraction + current_fraction <= 1):
            raise ConfigError(f"method.clean_fraction + mix_fraction + current_fraction must be within [0, 1], got "
                              f"{clean_fraction} + {mix_fraction} + {current_fraction}")
        self.eps_l2, self.kernel, self.generator_lr = float(eps_l2), check_kernel(kernel, "method.kernel"), generator_lr
        self.clean_fraction, self.current_fraction = clean_fraction, current_fraction
        self.replay_every, self.replay_size = replay_every, replay_size
        self.restart_every, self.restart_steps = restart_every, restart_steps
        if mix_fraction and (not mix_root or str(mix_root) == "???"):
            raise ConfigError("method.mix_fraction > 0 needs method.mix_root, an ImageFolder tree "
                              "<root>/<class>/<image> with the dataset's class folders (e.g. Stylized-ImageNet)")
        self.mix_root, self.mix_fraction = mix_root, mix_fraction
        self._mix_set = None
        self.name = f"ANT {kernel} (eps {eps_l2:g})" + (f" + {mix_fraction:.0%} images from {mix_root}" if mix_fraction
                                                          else "")
        self.generator: NoiseGenerator | None = None

    # ------------------------------------------------------------------ state
    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called on every rank; the seed of generator initializations and replay choices is rank
        0's (the run seed), the same on all ranks."""
        self.device = device
        self.channels = None  # known at the first batch
        self.replay: deque = deque(maxlen=self.replay_size)
        self.steps = 0
        self.seed = int(distributed.broadcast_object(torch.initial_seed() & 0x7FFFFFFF))

    def _new_generator(self, channels: int, seed: int | None = None) -> None:
        """A new generator, initialized from ``seed`` (default: from the run's seed and the step,
        the same on every rank)."""
        seed = derive_seed(self.seed, "generator", self.steps) if seed is None else seed
        self.generator = NoiseGenerator(channels, kernel=self.kernel, seed=seed).to(self.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr)
        self._spare = copy.deepcopy(self.generator)  # loads replayed states (no disk)

    def state_dict(self):
        if self.generator is None:
            return {"steps": self.steps, "seed": self.seed}
        return {"steps": self.steps, "seed": self.seed, "channels": self.generator.channels,
                "generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "replay": list(self.replay)}

    def load_state_dict(self, state):
        self.steps = int(state.get("steps", 0))
        self.seed = int(state.get("seed", self.seed))
        if "generator" in state:
            self._new_generator(int(state["channels"]))
            self.generator.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.replay = deque(state["replay"], maxlen=self.replay_size)

    # ------------------------------------------------------------------ noise
    def perturb(self, generator: NoiseGenerator, images: torch.Tensor) -> torch.Tensor:
        """``clip(x + eta g(z))`` with ``||clip(x + eta g(z)) - x||_2 = eps_l2`` per image."""
        return generator.perturb(images, self.eps_l2)

    def generator_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One Adam step of the generator maximizing the classifier's cross-entropy (eq. 2), with
        the classifier frozen (:func:`classifier_frozen`; gradients of the generator only) and the
        gradient averaged over ranks (one generator for the whole run)."""
        parameters = list(self.generator.parameters())
        distributed.broadcast_buffers(model)  # rank 0's running statistics on every rank (module doc)
        with classifier_frozen(model):
            loss = F.cross_entropy(model(self.perturb(self.generator, images)), labels)
            gradients = torch.autograd.grad(-loss, parameters)
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient
        distributed.average_gradients(parameters)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def restart(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        """A new generator, trained from scratch against the current classifier (Sec. 3.2: "we halt
        the ANT at regular intervals and train a new noise generator from scratch"); the
        classifier, BN statistics included, is not changed by these steps."""
        self._new_generator(images.shape[1])
        for _ in range(self.restart_steps):
            self.generator_step(model, images, labels)

    # ------------------------------------------------------------------ one step
    def split(self, batch_size: int) -> tuple[int, int, int, int]:
        """Images per part of a batch: clean, second source, current generator, replayed generators."""
        n_clean = int(round(self.clean_fraction * batch_size))
        n_mix = int(round(self.mix_fraction * batch_size))
        n_current = int(round(self.current_fraction * batch_size))
        return n_clean, n_mix, n_current, batch_size - n_clean - n_mix - n_current

    def _mix_images(self, shape, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` random (image, label) pairs of the second source, at the batch's channels and
        size; indices from torch's RNG (checkpointed, so resumed runs draw the same images)."""
        from torchvision import datasets, transforms

        from robustexp.errors import DatasetError

        _, c, h, w = shape
        if self._mix_set is None:
            steps = [transforms.Grayscale(1)] if c == 1 else []
            steps += [transforms.Resize((h, w)), transforms.ToTensor()]
            try:
                self._mix_set = datasets.ImageFolder(str(self.mix_root), transform=transforms.Compose(steps))
            except (FileNotFoundError, RuntimeError) as exc:
                raise DatasetError(f"method.mix_root={self.mix_root}: {exc}; expected <root>/<class>/<image>") from exc
        index = torch.randint(len(self._mix_set), (count,)).tolist()
        items = [self._mix_set[i] for i in index]
        return (torch.stack([x for x, _ in items]).to(device),
                torch.as_tensor([y for _, y in items], device=device))

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        if self.generator is None:
            self._new_generator(images.shape[1])
        self.steps += 1
        if self.restart_every and self.steps % self.restart_every == 0:
            self.restart(model, images, labels)
        n_clean, n_mix, n_current, n_replay = self.split(len(images))
        if n_mix:  # ANT+SIN: images from the second source, never perturbed
            mixed, mixed_labels = self._mix_images(images.shape, n_mix, images.device)
            images = torch.cat([images[:n_clean], mixed, images[n_clean + n_mix:]])
            labels = torch.cat([labels[:n_clean], mixed_labels, labels[n_clean + n_mix:]])
        noisy = n_clean + n_mix
        generator_loss = self.generator_step(model, images[noisy:], labels[noisy:])
        with torch.no_grad():
            current = self.perturb(self.generator, images[noisy:noisy + n_current])
            if self.replay:  # a past state chosen at random (Sec. 3.2), the same one on every rank
                choice = torch.Generator().manual_seed(derive_seed(self.seed, "replay", self.steps))
                self._spare.load_state_dict(self.replay[int(torch.randint(len(self.replay), (), generator=choice))])
                replayed = self.perturb(self._spare, images[noisy + n_current:])
            else:
                replayed = self.perturb(self.generator, images[noisy + n_current:])
        logits = model(torch.cat([images[:noisy], current, replayed]))
        loss = F.cross_entropy(logits, labels)
        if self.replay_every and self.steps % self.replay_every == 0:
            self.replay.append({k: v.detach().clone() for k, v in self.generator.state_dict().items()})
        return loss, {"loss": loss.item(), "acc": (logits.argmax(1) == labels).float().mean().item(),
                      "generator_ce": generator_loss}
