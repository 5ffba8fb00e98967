"""Loss-gradient images of a model with and without adaptive BN under Gaussian noise (Nandy et al.
2021, appendix C and Fig. 2; appendix F.2 for corruptions).

For each sigma, a batch of test images gets ``N(0, sigma^2 I)`` noise in [0, 1] pixel space (not
clipped, as in Table 1). The loss gradient of an image is ``grad_x CE(f(x), y)`` at the noisy image
``x`` with its true label ``y`` (the "loss gradients for individual pixels" of appendix C), taken

* without adaptation: the BN layers normalize with the source (training) statistics;
* with adaptation (when the run evaluates a BN adaptation variant): the BN statistics are first
  adapted on the batch of sigma-noised test images with the adaptation's rule (rho, n) and frozen
  (:func:`robustexp.adaptation.freeze.adapt_and_freeze`), as for certification and attacks (SPEC:
  BN statistics used while taking gradients are frozen); the gradient is then that of one fixed
  network. :class:`~robustexp.adaptation.freeze.FrozenStatisticsGuard` checks that no forward or
  backward pass changed them.

Visualization ("We scale, translate and clip the loss-gradient values for visualization, without
using any complex processing techniques", appendix C): per panel ``0.5 + g / (2 k sd(g))`` clipped
to [0, 1], k = ``clip_std`` (3: +-3 standard deviations of that gradient span the gray range, the
normalization of Tsipras et al. 2019 whose perceptual alignment the paper refers to); the colour
channels are kept (an RGB gradient shows as an RGB image, a gray one as gray). Each panel is scaled
on its own, so the picture shows where the gradient is, and the numbers below how large it is.

Numbers per image (all in the result, means in the summary):

* ``grad_norm``: ||g||_2;
* ``alignment``: |<x_clean, g>| / (||x_clean||_2 ||g||_2), the alignment between the gradient and the
  clean image of Etmann et al. 2019, which the paper cites for the perceptual alignment of the
  gradients of adversarially trained models (appendix C, F.2): higher is more image-like;
* ``loss`` and ``correct`` of the noisy image.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustexp.adaptation.freeze import FrozenStatisticsGuard, adapt_and_freeze, check_freezable
from robustexp.data.batches import evaluation_order
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, Evaluator
from robustexp.evaluation.certify import file_suffix
from robustexp.rendering import format_table
from robustexp.utils import derive_seed

STEM = "loss_gradient"


def input_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``grad_x CE(f(x), y)`` (same shape as ``images``) and the per-image losses, of
    ``model`` as it is (eval mode: BN uses its running buffers, so images do not interact). Only the
    input's gradient is taken; parameters get no ``.grad``."""
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        losses = F.cross_entropy(model(x), labels, reduction="none")
        (gradient,) = torch.autograd.grad(losses.sum(), x)
    return gradient.detach(), losses.detach()


def alignment(images: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Etmann et al. 2019: ``|<x, g>| / (||x|| ||g||)`` per image (0 where either is zero)."""
    x, g = images.flatten(1).double(), gradients.flatten(1).double()
    denominator = x.norm(dim=1) * g.norm(dim=1)
    value = (x * g).sum(1).abs() / denominator.clamp_min(1e-300)
    return torch.where(denominator > 0, value, torch.zeros_like(value)).float()


def visualize_gradient(gradient: torch.Tensor, clip_std: float = 3.0) -> torch.Tensor:
    """Nandy et al. appendix C: scale, translate and clip one gradient (C, H, W) to [0, 1]:
    ``0.5 + g / (2 clip_std sd(g))``, so 0 is mid-gray and +-clip_std sd are black / white."""
    sd = gradient.float().std()
    if not torch.isfinite(sd) or sd == 0:
        return torch.full_like(gradient, 0.5, dtype=torch.float32)
    return (0.5 + gradient.float() / (2 * clip_std * sd)).clamp(0, 1)


class LossGradientEvaluator(Evaluator):
    """Loss gradients w.r.t. the input image under Gaussian noise, without and with adaptive BN
    (Nandy et al. appendix C, Fig. 2). Writes ``loss_gradient<suffix>.png``: for every shown image a
    block of rows (noisy image; gradient without adaptation; gradient with adaptation, when the
    run's variant is a BN adaptation), one column per sigma; ``<suffix>`` is the variant's ``@...`` of
    metrics.json.

    Args:
        sigmas: noise levels in [0, 1] pixel space (Fig. 2: sigma 0 to 0.75, Table 1's grid).
        n_images: images shown and measured (the first of the evaluation order).
        adapt_batch_size: noisy test images the BN statistics are adapted on when the adaptation
            has no ``batch_size`` of its own (its n otherwise); the shown images are among them.
        clip_std: visualization range in standard deviations of each gradient.
        clip: clip noisy images to [0, 1] (default false, as Table 1).
        plot: write the PNG.
    """

    def __init__(self, sigmas=(0.0, 0.25, 0.5, 0.75), n_images: int = 4, adapt_batch_size: int = 512,
                 clip_std: float = 3.0, clip: bool = False, seed: int = 0, plot: bool = True):
        self.sigmas = tuple(float(s) for s in sigmas)
        if not self.sigmas or any(s < 0 for s in self.sigmas):
            raise ConfigError(f"eval loss_gradient sigmas={list(sigmas)}: expected a non-empty list of values >= 0")
        if int(n_images) < 1 or int(adapt_batch_size) < 1:
            raise ConfigError(f"eval loss_gradient needs n_images >= 1 and adapt_batch_size >= 1, got "
                              f"n_images={n_images}, adapt_batch_size={adapt_batch_size}")
        if not clip_std > 0:
            raise ConfigError(f"eval loss_gradient clip_std={clip_std}: expected a value > 0")
        self.n_images, self.adapt_batch_size = int(n_images), int(adapt_batch_size)
        self.clip_std, self.clip, self.seed, self.plot = float(clip_std), bool(clip), seed, bool(plot)

    # ------------------------------------------------------------------ evaluation
    def _measure(self, model: nn.Module, noisy: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor,
                 what: str) -> tuple[torch.Tensor, dict[str, list]]:
        guard = FrozenStatisticsGuard(model, f"eval loss_gradient ({what})")
        gradient, losses = input_gradient(model, noisy, labels)
        with torch.no_grad():
            correct = model(noisy).argmax(1) == labels
        guard.check()
        numbers = {"grad_norm": gradient.flatten(1).norm(dim=1).tolist(),
                   "alignment": alignment(clean, gradient).tolist(),
                   "loss": losses.tolist(), "correct": correct.tolist()}
        return gradient.cpu(), numbers

    def _noise(self, indices: list[int], sigma: float, like: torch.Tensor) -> torch.Tensor:
        """N(0, I) per test image, seeded by (seed, sigma, image index): an image gets the same noise
        with and without adaptation, whatever the number of images drawn."""
        noise = [torch.randn(like.shape[1:], dtype=like.dtype, generator=torch.Generator().manual_seed(
            derive_seed(self.seed, "loss_gradient", f"{sigma:g}", index))) for index in indices]
        return torch.stack(noise).to(like.device)

    def evaluate(self, model, data, ctx: EvalContext):
        start = time.perf_counter()
        adaptation = check_freezable(ctx.adaptation, "loss_gradient")
        n_adapt = (adaptation.batch_size or self.adapt_batch_size) if adaptation is not None else 0
        n_total = min(len(data.test), max(self.n_images, n_adapt))
        indices = evaluation_order(len(data.test), n_total).tolist()
        clean = torch.stack([data.test[i][0] for i in indices]).to(ctx.device)
        labels = torch.as_tensor([int(data.test[i][1]) for i in indices], device=ctx.device)
        k = min(self.n_images, n_total)
        model.eval()
        results, panels = {}, {}
        for sigma in self.sigmas:
            noisy = clean + sigma * self._noise(indices, sigma, clean)
            if self.clip:
                noisy = noisy.clamp(0, 1)
            entry, rows = {}, {"image": noisy[:k].cpu()}
            try:
                if adaptation is not None:  # the source statistics, frozen: the unadapted model
                    adaptation.reset()
                    adaptation.freeze()
                rows["unadapted"], entry["unadapted"] = self._measure(model, noisy[:k], clean[:k], labels[:k],
                                                                      f"sigma={sigma:g}, unadapted")
                if adaptation is not None:
                    adapt_and_freeze(model, adaptation, noisy)  # Nandy et al. Sec. 3: adapt, then freeze
                    rows["adapted"], entry["adapted"] = self._measure(model, noisy[:k], clean[:k], labels[:k],
                                                                      f"sigma={sigma:g}, adapted")
            finally:
                if adaptation is not None:
                    adaptation.reset()
            for numbers in (entry.get("unadapted"), entry.get("adapted")):
                if numbers is not None:
                    numbers["grad_norm_mean"] = float(np.mean(numbers["grad_norm"]))
                    numbers["alignment_mean"] = float(np.mean(numbers["alignment"]))
            results[f"{sigma:g}"], panels[sigma] = entry, rows
            ctx.log({f"loss_gradient/sigma{sigma:g}/{which}_alignment": entry[which]["alignment_mean"]
                     for which in ("unadapted", "adapted") if which in entry})
        out = {"sigmas": results, "images": k, "indices": indices[:k], "labels": labels[:k].tolist(),
               "adapt_batch_size": n_total if adaptation is not None else None, "clip_std": self.clip_std,
               "adaptation": adaptation.describe() if adaptation is not None else None, "png": None}
        if self.plot:
            path = Path(ctx.run_dir) / f"{STEM}{file_suffix(ctx)}.png"
            self.write_grid(panels, path, f"{data.name}: loss gradients under Gaussian noise"
                            + (f"\nwith: {out['adaptation']}, adapted on {n_total} noisy test images, frozen"
                               if adaptation is not None else ""))
            out["png"] = path.name
        out["seconds"] = time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ output
    def write_grid(self, panels: dict[float, dict[str, torch.Tensor]], path: Path, title: str) -> Path:
        """For every image a block of rows (noisy image, gradient w/o adaptation, gradient with it),
        one column per sigma."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sigmas = list(panels)
        kinds = [kind for kind in ("image", "unadapted", "adapted") if kind in panels[sigmas[0]]]
        names = {"image": "noisy image", "unadapted": "gradient\nw/o adapt. BN", "adapted": "gradient\nwith adapt. BN"}
        n_images = len(panels[sigmas[0]]["image"])
        rows = n_images * len(kinds)
        fig, axes = plt.subplots(rows, len(sigmas), figsize=(1.5 * len(sigmas) + 1.2, 1.5 * rows + 0.6),
                                 squeeze=False)
        for column, sigma in enumerate(sigmas):
            for i in range(n_images):
                for j, kind in enumerate(kinds):
                    ax = axes[i * len(kinds) + j][column]
                    tensor = panels[sigma][kind][i]
                    picture = tensor.clamp(0, 1) if kind == "image" else visualize_gradient(tensor, self.clip_std)
                    picture = picture.permute(1, 2, 0).numpy()
                    ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if i == 0 and j == 0:
                        ax.set_title(f"sigma={sigma:g}", fontsize=8)
                    if column == 0:
                        ax.set_ylabel(names[kind], fontsize=7, rotation=0, ha="right", va="center")
        width, height = fig.get_size_inches()
        wrapped = "\n".join(textwrap.fill(line, width=int(11 * width)) for line in title.splitlines())
        fig.suptitle(wrapped, fontsize=8)
        fig.tight_layout(rect=(0, 0.1 / height, 1, 1 - 0.13 * (wrapped.count("\n") + 1) / height))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def table(self, results):
        rows = []
        for sigma, entry in results["sigmas"].items():
            row = [f"sigma={sigma}"]
            for which in ("unadapted", "adapted"):
                numbers = entry.get(which)
                row += ["", ""] if numbers is None else [numbers["grad_norm_mean"], numbers["alignment_mean"]]
            rows.append(row)
        headers = ["loss gradient", "L2 norm w/o", "alignment w/o", "L2 norm with", "alignment with"]
        return (format_table(headers, rows, precision=3)
                + f"\nmeans over {results['images']} images; alignment |<x, g>| / (||x|| ||g||) with the clean image "
                  f"(Etmann et al. 2019); {results['adaptation'] or 'no adaptation'}"
                  + (f"; {results['png']}" if results["png"] else "") + f"; {results['seconds']:.0f} s")

    def headline(self, results):
        out = {}
        for sigma, entry in results["sigmas"].items():
            for which in ("unadapted", "adapted"):
                if which in entry:
                    out[f"grad_alignment_{which}_sigma{sigma}"] = entry[which]["alignment_mean"]
        return out


__all__ = ["LossGradientEvaluator", "alignment", "input_gradient", "visualize_gradient"]
