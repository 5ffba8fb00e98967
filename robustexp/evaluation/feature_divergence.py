"""Feature divergence between two data sources, per layer (Shu et al. 2021, Sec. 5.3, eqs. 4-5,
Fig. 5; after Pan et al. 2018).

Every channel of a layer's output is modelled by a normal distribution with the channel's mean
and standard deviation over a whole data source (all images, all positions), and the divergence
of the layer is the symmetric KL divergence averaged over channels:

    D(F_A || F_B) = 1/C sum_i [KL(F_A^i || F_B^i) + KL(F_B^i || F_A^i)]                    (4)
    KL(F_A^i || F_B^i) = log(s_B / s_A) + (s_A^2 + (mu_A - mu_B)^2) / (2 s_B^2) - 1/2       (5)

Sources: the reference A is the clean test split (or an image folder); each B is a (corruption,
severity) subset from the run's corruption source (generated or on disk) or an image folder.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from robustexp.adaptation.base import require_unadapted
from robustexp.data.batches import test_batches
from robustexp.data.corruptions.sources import CorruptionSource
from robustexp.errors import ConfigError, DatasetError
from robustexp.evaluation.base import EvalContext, Evaluator
from robustexp.evaluation.corruptions import _subsets
from robustexp.models.dual_bn import DualBatchNorm, dual_bn_layers
from robustexp.models.splitting import inner_network, split_network
from robustexp.rendering import format_table, save_figure

CSV_STEM, PLOT_STEM = "feature_divergence", "feature_divergence"
VARIANCE = ("biased variance over every image and position of the source, plus var_eps (a channel that is "
            "constant on both sources would otherwise give 0/0)")


# ---------------------------------------------------------------------------- the formulas
def gaussian_kl(mu_a: torch.Tensor, var_a: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor) -> torch.Tensor:
    """Eq. (5), per channel: KL(N(mu_a, var_a) || N(mu_b, var_b))."""
    return 0.5 * torch.log(var_b / var_a) + (var_a + (mu_a - mu_b) ** 2) / (2 * var_b) - 0.5


def symmetric_kl(mu_a, var_a, mu_b, var_b) -> torch.Tensor:
    """The summand of eq. (4), per channel: KL(A || B) + KL(B || A)."""
    return gaussian_kl(mu_a, var_a, mu_b, var_b) + gaussian_kl(mu_b, var_b, mu_a, var_a)


def feature_divergence(stats_a: tuple[torch.Tensor, torch.Tensor], stats_b: tuple[torch.Tensor, torch.Tensor],
                       var_eps: float = 0.0) -> float:
    """Eq. (4): the channel mean of the symmetric KL between the per-channel normal models of two
    feature sets, each given as (mean, variance) per channel."""
    (mu_a, var_a), (mu_b, var_b) = stats_a, stats_b
    return float(symmetric_kl(mu_a.double(), var_a.double() + var_eps, mu_b.double(), var_b.double() + var_eps)
                 .mean())


class ChannelMoments:
    """Running per-channel count, sum and sum of squares (float64) of tensors (N, C, ...)."""

    def __init__(self):
        self.count, self.total, self.total_sq = 0, None, None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        if self.total is None:
            self.total, self.total_sq = torch.zeros(len(x), dtype=torch.float64, device=x.device), \
                torch.zeros(len(x), dtype=torch.float64, device=x.device)
        self.count += x.shape[1]
        self.total += x.sum(1)
        self.total_sq += (x * x).sum(1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) per channel."""
        mean = self.total / self.count
        return mean.cpu(), (self.total_sq / self.count - mean * mean).clamp_min(0).cpu()


@torch.no_grad()
def collect_feature_statistics(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable,
                               device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, biased variance) of every layer's output over all ``batches`` of
    (images, labels), with ``model`` in eval mode."""
    model.eval()
    moments = {name: ChannelMoments() for name in layers}

    def recorder(name):
        def hook(module, inputs, output):
            if not torch.is_tensor(output) or output.dim() < 2:
                raise ConfigError(f"feature divergence: the output of {name} is not a (N, C, ...) tensor")
            moments[name].update(output)
        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in layers.items()]
    try:
        for images, _ in batches:
            model(images.to(device, non_blocking=True))
    finally:
        for handle in handles:
            handle.remove()
    silent = [name for name, m in moments.items() if m.count == 0]
    if silent:
        raise ConfigError(f"feature divergence: the layers {silent} did not run in a forward pass")
    return {name: m.result() for name, m in moments.items()}


def default_layers(net: nn.Module, after: str | None) -> list[str]:
    """The BatchNorm layers after ``after`` (all of them when None), a dual BN counted once; in a
    network without BatchNorm, its convolutions and linear layers. KL (eq. 5) is invariant to the
    same per-channel affine map applied to both sources, so an eval-mode BN's output has the
    divergence of its input (the convolution before it)."""
    option = "eval.evaluators.feature_divergence.after"  # method.layer unless set
    candidates = split_network(net, after, option)[2] if after else list(net.named_modules())[1:]
    inside_dual = {f"{n}.{b}" for n, _ in dual_bn_layers(net) for b in ("main", "aux")}
    chosen = [n for n, m in candidates if isinstance(m, (_BatchNorm, DualBatchNorm)) and n not in inside_dual]
    if not chosen:
        chosen = [n for n, m in candidates if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    if not chosen:
        raise ConfigError(f"feature divergence: no BatchNorm, convolution or linear layer after {after!r} in "
                          f"{type(net).__name__}; list eval.evaluators.feature_divergence.layers")
    return chosen


def _folder_batches(root: str, shape: tuple[int, int, int], batch_size: int, ctx: EvalContext, max_images):
    """(images, labels) batches of an ImageFolder tree, at the dataset's channels and size."""
    from torchvision import datasets, transforms

    c, h, w = shape
    steps = [transforms.Grayscale(1)] if c == 1 else [transforms.Lambda(lambda im: im.convert("RGB"))]
    steps += [transforms.Resize((h, w)), transforms.ToTensor()]
    try:
        folder = datasets.ImageFolder(str(Path(root).expanduser()), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"feature divergence folder {root}: {exc}; expected <root>/<class>/<image>") from exc
    return test_batches(folder, batch_size, ctx, max_images)


def _branch_suffix(net: nn.Module) -> str:
    """``_bn-main`` / ``_bn-aux`` for a model with auxiliary BNs (the branch being evaluated), so
    that the files of the two evaluation modes do not overwrite each other."""
    branches = {layer.active for _, layer in dual_bn_layers(net)}
    return f"_bn-{branches.pop()}" if len(branches) == 1 else ""


class FeatureDivergenceEvaluator(Evaluator):
    """Symmetric-KL feature divergence (eqs. 4-5) between a reference source and each target
    source, for each layer after ``after`` (Fig. 5).

    Args:
        source: where corrupted images come from (the run's ``corruptions``).
        corruptions, severities: the (corruption, severity) targets (null severities: all of the
            benchmark's); ``corruptions: []`` for folders only.
        folders: ``{label: path}`` of ImageFolder trees as further targets (e.g. a stylized or
            sketch copy of the test set).
        reference: ``clean`` (the test split) or the path of an ImageFolder tree.
        after: the layer after which divergence is measured (an AdvBN run passes its
            ``method.layer``); null: every layer.
        layers: ``auto`` (:func:`default_layers`) or a list of module names (relative to the
            network inside the normalization wrapper).
        var_eps: added to every variance (see :data:`VARIANCE`).
        compare_with: a ``feature_divergence*.csv`` of another run (e.g. the standard model whose
            fine-tuned copy this is): its mean curve is drawn in the plot, as in Fig. 5.
    """

    per_variant = False  # the features of the model as trained, whatever the test-time adaptation

    def __init__(self, source: CorruptionSource, corruptions="common", severities=None,
                 folders: Mapping[str, str] | None = None, reference: str = "clean", after: str | None = None,
                 layers="auto", batch_size: int = 500, max_images: int | None = None, var_eps: float = 1e-5,
                 plot: bool = True, compare_with: str | None = None):
        self.source = source
        names = list(corruptions) if not isinstance(corruptions, str) else corruptions
        self.corruptions, self.severities = _subsets(source, names, severities) if names else ((), ())
        self.folders = dict(folders or {})
        if not self.corruptions and not self.folders:
            raise ConfigError("feature divergence needs targets: eval.evaluators.feature_divergence.corruptions "
                              "and/or .folders={label: path}")
        self.reference, self.after = str(reference), after or None
        if layers != "auto" and (isinstance(layers, str) or not list(layers)):
            raise ConfigError(f"eval.evaluators.feature_divergence.layers={layers!r}; expected 'auto' or a list "
                              f"of module names")
        self.layers = layers
        if var_eps < 0:
            raise ConfigError(f"eval.evaluators.feature_divergence.var_eps must be >= 0, got {var_eps}")
        self.batch_size, self.max_images, self.var_eps = batch_size, max_images, float(var_eps)
        self.plot, self.compare_with = plot, compare_with

    def _layers(self, net: nn.Module) -> dict[str, nn.Module]:
        modules = dict(net.named_modules())
        names = default_layers(net, self.after) if self.layers == "auto" else [str(n) for n in self.layers]
        unknown = [n for n in names if n not in modules or not n]
        if unknown:
            raise ConfigError(f"eval.evaluators.feature_divergence.layers: {unknown} are not modules of "
                              f"{type(net).__name__} (e.g. {[n for n in modules if n][:20]})")
        return {n: modules[n] for n in names}

    def _reference_batches(self, data, ctx):
        if self.reference == "clean":
            return test_batches(data.test, self.batch_size, ctx, self.max_images)
        return _folder_batches(self.reference, data.input_shape, self.batch_size, ctx, self.max_images)

    def evaluate(self, model, data, ctx: EvalContext):
        start = time.perf_counter()
        require_unadapted(ctx.adaptation, "feature_divergence")  # the features of the model as trained
        net = inner_network(model)
        layers = self._layers(net)
        suffix = _branch_suffix(net)
        targets = [(f"{c}/s{s}", (c, s)) for c in self.corruptions for s in self.severities]
        targets += [(label, path) for label, path in self.folders.items()]
        reference = collect_feature_statistics(model, layers, self._reference_batches(data, ctx), ctx.device)
        divergence: dict[str, dict[str, float]] = {}
        bar = tqdm(targets, desc="feature divergence", disable=not ctx.progress, mininterval=1.0)
        try:
            for label, target in bar:
                bar.set_postfix_str(label)
                if isinstance(target, tuple):
                    batches = self.source.batches(data, target[0], target[1], self.batch_size, ctx, self.max_images)
                else:
                    batches = _folder_batches(target, data.input_shape, self.batch_size, ctx, self.max_images)
                stats = collect_feature_statistics(model, layers, batches, ctx.device)
                divergence[label] = {n: feature_divergence(reference[n], stats[n], self.var_eps) for n in layers}
        finally:
            bar.close()
            self.source.close()
        names = list(layers)
        per_layer = {n: float(np.mean([divergence[t][n] for t in divergence])) for n in names}
        results = {"reference": self.reference, "source": self.source.description, "after": self.after,
                   "layers": names, "channels": {n: int(len(reference[n][0])) for n in names},
                   "divergence": divergence, "mean_per_layer": per_layer,
                   "mean": float(np.mean(list(per_layer.values()))), "variance": VARIANCE, "var_eps": self.var_eps,
                   "bn_branch": suffix.removeprefix("_bn-") or None, "seconds": time.perf_counter() - start}
        ctx.log({f"feature_divergence/{n}": v for n, v in per_layer.items()})
        if self.plot:
            run_dir = Path(ctx.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            results["files"] = [self.write_csv(results, run_dir / f"{CSV_STEM}{suffix}.csv").name,
                                self.plot_layers(results, run_dir / f"{PLOT_STEM}{suffix}.png").name]
        return results

    # ------------------------------------------------------------------ files
    @staticmethod
    def write_csv(results, path: Path) -> Path:
        """Long format: one row per (target, layer)."""
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["reference", "target", "layer", "channels", "divergence"])
            for target, by_layer in results["divergence"].items():
                for layer, value in by_layer.items():
                    writer.writerow([results["reference"], target, layer, results["channels"][layer], value])
        return path

    @staticmethod
    def read_mean_curve(path: str) -> dict[str, float]:
        """Mean divergence per layer of a CSV written by :meth:`write_csv`."""
        file = Path(str(path)).expanduser()
        if not file.is_file():
            raise ConfigError(f"eval.evaluators.feature_divergence.compare_with={path}: no such file (expected a "
                              f"feature_divergence*.csv of another run)")
        values: dict[str, list[float]] = {}
        with open(file, newline="") as handle:
            for row in csv.DictReader(handle):
                values.setdefault(row["layer"], []).append(float(row["divergence"]))
        return {layer: float(np.mean(v)) for layer, v in values.items()}

    def plot_layers(self, results, path: Path) -> Path:
        """Fig. 5: divergence per layer, one thin line per target, the mean in black, and the mean
        of another run (``compare_with``) dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = results["layers"]
        x = np.arange(len(layers))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 2), 4.2))
        many = len(results["divergence"]) > 10
        for target, by_layer in results["divergence"].items():
            ax.plot(x, [by_layer[n] for n in layers], lw=0.8, alpha=0.5 if many else 0.9, marker=".",
                    label=None if many else target)
        branch = f" ({results['bn_branch']} BN)" if results.get("bn_branch") else ""
        ax.plot(x, [results["mean_per_layer"][n] for n in layers], color="black", lw=2.2, marker="o",
                label=f"this model{branch}: mean of {len(results['divergence'])} targets")
        if self.compare_with:
            other = self.read_mean_curve(self.compare_with)
            shared = [i for i, n in enumerate(layers) if n in other]
            if shared:
                ax.plot(shared, [other[layers[i]] for i in shared], color="tab:red", lw=2, ls="--", marker="s",
                        label=f"{Path(self.compare_with).parent.name}: mean")
        ax.set_xticks(x)
        ax.set_xticklabels(layers, rotation=90 if len(layers) > 6 else 0, fontsize=7 if len(layers) > 20 else 8)
        ax.set_ylabel("symmetric KL divergence (eq. 4)")
        ax.set_xlabel("layer" + (f" (after {results['after']})" if results.get("after") else ""))
        ax.set_title(f"feature divergence: {results['reference']} vs targets{branch}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        return save_figure(fig, path)

    # ------------------------------------------------------------------ reporting
    def table(self, results):
        layers, divergence = results["layers"], results["divergence"]
        targets = list(divergence)
        if len(targets) <= 6:
            headers = ["layer", "channels", *targets, "mean"]
            rows = [[n, results["channels"][n], *(divergence[t][n] for t in targets), results["mean_per_layer"][n]]
                    for n in layers]
        else:
            headers = ["layer", "channels", f"mean of {len(targets)} targets", "min", "max"]
            rows = [[n, results["channels"][n], results["mean_per_layer"][n],
                     min(divergence[t][n] for t in targets), max(divergence[t][n] for t in targets)] for n in layers]
        text = format_table(headers, rows, precision=3)
        text += (f"\n\nsymmetric KL (eqs. 4-5), {results['reference']} vs each target, mean over layers "
                 f"{results['mean']:.3f}; {results['source']}, {results['seconds']:.0f} s")
        return text

    def headline(self, results):
        last = results["layers"][-1]
        return {"fdiv_mean": results["mean"], "fdiv_last_layer": results["mean_per_layer"][last]}
