"""The noise generator of Adversarial Noise Training (Rusak et al. 2020, Sec. 3.2) and the frozen
classifier it is trained against.

Shared by the training method (:mod:`robustexp.methods.ant`, which trains generators jointly with
the classifier) and the evaluation (:mod:`robustexp.evaluation.eps_star`, which trains new
generators against a finished classifier, Sec. 3.3): both build their generators from here, so
neither layer reaches into the other.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from robustexp.errors import ConfigError
from robustexp.perturbations import rescale_to_l2

KERNELS = ("1x1", "3x3")


def check_kernel(kernel: str, option: str = "noise generator kernel") -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else a ConfigError naming ``option`` (the config
    key the value came from, e.g. ``method.kernel``)."""
    if kernel not in KERNELS:
        raise ConfigError(f"{option}={kernel!r}; expected '1x1' or '3x3'")
    return kernel


@contextlib.contextmanager
def classifier_frozen(model: nn.Module):
    """``model`` as a fixed function while a generator trains against it (Rusak et al. Sec. 3.2,
    eq. 2: the generator maximizes the loss of the current classifier): every module in eval mode
    (BatchNorm uses and keeps its running statistics and ``num_batches_tracked``; dropout is off),
    each module's own train/eval flag restored on exit (a module frozen in eval mode stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class NoiseGenerator(nn.Module):
    """``g(z) = conv4(relu(conv3(relu(conv2(relu(conv1(z))))))) + z``, channels C-20-20-20-C,
    weights ~ N(0, 0.01^2), biases 0, so that a new generator outputs (almost) its Gaussian input.

    ``kernel="1x1"``: every convolution is 1x1: pixels are independent (no spatial receptive
    field). ``kernel="3x3"``: the second convolution is 3x3 without padding, applied to a z of
    (H + 2, W + 2); the residual is the centre of z.
    """

    def __init__(self, channels: int, hidden: int = 20, kernel: str = "1x1", init_std: float = 0.01,
                 seed: int | None = None):
        super().__init__()
        check_kernel(kernel)
        self.kernel, self.channels = kernel, channels
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3 if kernel == "3x3" else 1)
        self.conv3 = nn.Conv2d(hidden, hidden, 1)
        self.conv4 = nn.Conv2d(hidden, channels, 1)
        rng = torch.Generator().manual_seed(seed) if seed is not None else None  # None: the global RNG
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            nn.init.normal_(conv.weight, 0.0, init_std, generator=rng)
            nn.init.zeros_(conv.bias)

    @property
    def margin(self) -> int:
        return 1 if self.kernel == "3x3" else 0

    def input_shape(self, shape) -> tuple[int, int, int, int]:
        """The shape of z for images of ``shape`` (B, C, H, W): larger by the 3x3 margin."""
        b, c, h, w = shape
        return b, c, h + 2 * self.margin, w + 2 * self.margin

    def sample_input(self, shape, device) -> torch.Tensor:
        """z ~ N(0, I) for images of ``shape``, from torch's global RNG."""
        return torch.randn(self.input_shape(shape), device=device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.conv4(F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(z)))))))
        m = self.margin
        return out + (z[..., m:z.shape[-2] - m, m:z.shape[-1] - m] if m else z)

    def perturb(self, images: torch.Tensor, eps_l2: float) -> torch.Tensor:
        """``clip(x + eta g(z))`` with ``||clip(x + eta g(z)) - x||_2 = eps_l2`` per image (Rusak et al.
        footnote 3, clipping-aware rescaling), z drawn by :meth:`sample_input`."""
        delta = self(self.sample_input(images.shape, images.device))
        return rescale_to_l2(images, delta, eps_l2)
