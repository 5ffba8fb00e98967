"""Robust accuracy under PGD in L-inf and L2 (Madry et al. 2018), and EoT-PGD against models with
test-time BN adaptation (Nandy et al. 2021, Sec. 3 and appendix E).

* Without adaptation: PGD (``robustexp.attacks.pgd``, Nandy et al. appendix E eq. 2) on the
  per-example cross-entropy of the model in eval mode.
* With a BN adaptation the statistics depend on the batch being classified, so the gradient of
  the defended model is not that of one fixed network. EoT (Nandy et al. appendix E, eq. 3;
  Athalye et al. 2018): m copies f_theta(i) of the model whose BN statistics were adapted on the
  test batch perturbed by a random delta_i from the threat model (a uniform draw from the eps
  ball, projected into [0, 1]) and frozen; the attack maximizes
  ``-log( (1/m) sum_i softmax(f_theta(i)(x + delta))_y )`` (``eot_loss: log_mean_prob``, the log
  outside the expectation as in the paper) or the mean cross-entropy over the copies
  (``eot_loss: mean_ce``). The copies share the weights: only their m sets of BN statistics
  are kept and swapped into the layers (:class:`BNStatisticsBank`).
* The defended model classifies a batch of adversarial images as it classifies any test batch:
  the adaptation estimates its statistics on that batch (reset before and after).

An image counts as robust only if it is classified correctly clean and after every restart
(each restart is its own PGD run from a new random start).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from robustexp.adaptation.bn import batchnorm_layers
from robustexp.adaptation.freeze import FrozenStatisticsGuard, adapt_and_freeze, check_freezable
from robustexp.attacks import check_norm, pgd, random_start
from robustexp.data.batches import test_batches
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, Evaluator
from robustexp.rendering import format_table
from robustexp.utils import derive_seed

EOT_LOSSES = ("log_mean_prob", "mean_ce")


class BNStatisticsBank:
    """m sets of BN running statistics for one model (its EoT copies). :meth:`load` makes set i
    the layers' buffers by assignment (never in place, so the autograd graph of an earlier copy's
    forward pass stays valid); :meth:`restore` puts the model's own buffer tensors back."""

    def __init__(self, model: nn.Module):
        self.layers = [layer for _, layer in batchnorm_layers(model)]
        self.original = [(layer.running_mean, layer.running_var) for layer in self.layers]
        self.sets: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def capture(self) -> None:
        """Add the layers' current statistics as a new set."""
        self.sets.append([(layer.running_mean.detach().clone(), layer.running_var.detach().clone())
                          for layer in self.layers])

    def load(self, index: int) -> None:
        for layer, (mean, var) in zip(self.layers, self.sets[index]):
            layer.running_mean = mean
            layer.running_var = var

    def restore(self) -> None:
        for layer, (mean, var) in zip(self.layers, self.original):
            layer.running_mean = mean
            layer.running_var = var

    def __len__(self) -> int:
        return len(self.sets)


def build_eot_copies(model: nn.Module, adaptation, images: torch.Tensor, m: int, norm: str, eps: float,
                     generator: torch.Generator | None = None) -> BNStatisticsBank:
    """Nandy et al. appendix E: m sets of BN statistics, set i adapted (with the adaptation's
    rule) on ``images + delta_i``, ``delta_i`` uniform in the ``eps`` ball of ``norm`` and within
    [0, 1]. Leaves the adaptation frozen; call ``bank.restore()`` and ``adaptation.reset()`` after."""
    bank = BNStatisticsBank(model)
    for _ in range(m):
        delta = random_start(images, norm, eps, generator)
        adapt_and_freeze(model, adaptation, images + delta)
        bank.capture()
    return bank


def eot_loss(model: nn.Module, bank: BNStatisticsBank, images: torch.Tensor, labels: torch.Tensor,
             kind: str = "log_mean_prob") -> torch.Tensor:
    """Per-example EoT loss over the copies in ``bank`` (Nandy et al. appendix E eq. 3):
    ``log_mean_prob``: ``-log((1/m) sum_i p_i(y | x))``; ``mean_ce``: ``(1/m) sum_i -log p_i(y | x)``."""
    log_probs = []
    for i in range(len(bank)):
        bank.load(i)
        log_probs.append(F.log_softmax(model(images).float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1))
    stacked = torch.stack(log_probs)  # (m, B)
    if kind == "log_mean_prob":
        return -(torch.logsumexp(stacked, dim=0) - math.log(len(bank)))
    if kind == "mean_ce":
        return -stacked.mean(0)
    raise ConfigError(f"eval pgd eot_loss={kind!r}; expected one of {EOT_LOSSES}")


@torch.no_grad()
def defended_predictions(model: nn.Module, adaptation, images: torch.Tensor) -> torch.Tensor:
    """Predictions of the deployed model on one test batch: without adaptation the model in eval
    mode; with one, statistics estimated on this batch by the adaptation's rule (full: the
    batch's statistics, then predict), reset before and after."""
    model.eval()
    if adaptation is None:
        return model(images).argmax(1)
    adaptation.reset()
    try:
        adaptation.prepare_subset(model, [(images, None)], images.device)  # full: this batch's statistics
        return model(images).argmax(1)
    finally:
        adaptation.reset()


def attack_batch(model: nn.Module, adaptation, images: torch.Tensor, labels: torch.Tensor, *, norm: str,
                 eps: float, step_size: float, steps: int, restarts: int = 1, random_init: bool = True,
                 eot_samples: int = 10, eot_loss_kind: str = "log_mean_prob",
                 generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], dict]:
    """Adversarial images of one batch, one tensor per restart: PGD on the cross-entropy of the
    model (no adaptation), or EoT-PGD over ``eot_samples`` BN-adapted copies (with one)."""
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    info = {}
    try:
        if adaptation is None:
            guard = FrozenStatisticsGuard(model, "eval pgd")

            def loss_fn(x, y):
                return F.cross_entropy(model(x), y, reduction="none")

            adversarial = [pgd(loss_fn, images, labels, norm=norm, eps=eps, step_size=step_size, steps=steps,
                               random_init=random_init, restarts=1, generator=generator) for _ in range(restarts)]
            guard.check()
            return adversarial, info
        bank = build_eot_copies(model, adaptation, images, eot_samples, norm, eps, generator)
        try:
            info["copies_max_mean_spread"] = max(
                float(torch.stack([s[j][0] for s in bank.sets]).std(0).max()) if len(bank) > 1 else 0.0
                for j in range(len(bank.layers)))
            adversarial = [pgd(lambda x, y: eot_loss(model, bank, x, y, eot_loss_kind), images, labels, norm=norm,
                               eps=eps, step_size=step_size, steps=steps, random_init=random_init, restarts=1,
                               generator=generator) for _ in range(restarts)]
        finally:
            bank.restore()
            adaptation.reset()
        return adversarial, info
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)


def _attack_spec(name: str, spec: Mapping) -> dict:
    spec = dict(spec)
    unknown = set(spec) - {"norm", "eps", "step_size", "steps", "restarts", "random_init"}
    if unknown:
        raise ConfigError(f"eval pgd attacks.{name}: unknown option(s) {sorted(unknown)}; expected norm, eps, "
                          "step_size, steps, restarts, random_init")
    if "norm" not in spec or "eps" not in spec:
        raise ConfigError(f"eval pgd attacks.{name} needs norm (linf | l2) and eps")
    norm = check_norm(spec["norm"])
    eps, steps = float(spec["eps"]), int(spec.get("steps", 100))
    step_size = spec.get("step_size")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)  # Madry et al.
    restarts = int(spec.get("restarts", 1))
    if eps < 0 or steps < 0 or step_size < 0 or restarts < 1:
        raise ConfigError(f"eval pgd attacks.{name}: needs eps >= 0, steps >= 0, step_size >= 0 and restarts >= 1; "
                          f"got eps={eps}, steps={steps}, step_size={step_size}, restarts={restarts}")
    return {"norm": norm, "eps": eps, "step_size": step_size, "steps": steps, "restarts": restarts,
            "random_init": bool(spec.get("random_init", True))}


class AdversarialEvaluator(Evaluator):
    """Robust top-1 under each attack in ``attacks`` (name -> norm, eps, steps, step_size,
    restarts, random_init; ``step_size: null`` is 2.5 eps / steps), on a random subset of
    ``max_images`` test images. Under a BN adaptation the attack is EoT-PGD over ``eot_samples``
    adapted copies and the batches are the adaptation's test batches (its ``batch_size``).

    Args:
        attacks: mapping of attack name to its settings.
        max_images: images attacked (a random subset, :func:`evaluation_order`); null: all.
        batch_size: images per attacked batch without adaptation.
        eot_samples: m, the BN-adapted copies of EoT (Nandy et al.: 10).
        eot_loss: ``log_mean_prob`` (Nandy et al. eq. 3) or ``mean_ce``.
    """

    def __init__(self, attacks: Mapping, max_images: int | None = 200, batch_size: int = 200, eot_samples: int = 10,
                 eot_loss: str = "log_mean_prob", seed: int = 0):
        if not attacks:
            raise ConfigError("eval pgd attacks is empty; give at least one attack (norm, eps, steps, ...)")
        self.attacks = {str(name): _attack_spec(str(name), spec) for name, spec in dict(attacks).items()}
        if eot_loss not in EOT_LOSSES:
            raise ConfigError(f"eval pgd eot_loss={eot_loss!r}; expected one of {EOT_LOSSES}")
        if int(eot_samples) < 1 or int(batch_size) < 1:
            raise ConfigError(f"eval pgd needs eot_samples >= 1 and batch_size >= 1, got {eot_samples}, {batch_size}")
        self.max_images, self.batch_size, self.eot_samples = max_images, int(batch_size), int(eot_samples)
        self.eot_loss, self.seed = eot_loss, seed

    def evaluate(self, model, data, ctx: EvalContext):
        adaptation = check_freezable(ctx.adaptation, "pgd")
        batch_size = (adaptation.batch_size if adaptation is not None else None) or self.batch_size
        results = {}
        for name, spec in self.attacks.items():
            start = time.perf_counter()
            clean, robust, per_restart, n, spreads = 0, 0, [0] * spec["restarts"], 0, []
            batches = list(test_batches(data.test, batch_size, ctx, self.max_images))
            for index, (images, labels) in enumerate(tqdm(batches, desc=f"pgd {name}", disable=not ctx.progress,
                                                          mininterval=1.0)):
                images, labels = images.to(ctx.device), labels.to(ctx.device)
                generator = torch.Generator(device=ctx.device).manual_seed(derive_seed(self.seed, name, index))
                adversarial, info = attack_batch(model, adaptation, images, labels, **spec,
                                                 eot_samples=self.eot_samples, eot_loss_kind=self.eot_loss,
                                                 generator=generator)
                if "copies_max_mean_spread" in info:
                    spreads.append(info["copies_max_mean_spread"])
                correct_clean = defended_predictions(model, adaptation, images) == labels
                robust_all = torch.ones_like(labels, dtype=torch.bool)
                for r, adv in enumerate(adversarial):
                    ok = defended_predictions(model, adaptation, adv) == labels
                    per_restart[r] += int(ok.sum())
                    robust_all &= ok
                clean += int(correct_clean.sum())
                robust += int((robust_all & correct_clean).sum())
                n += len(labels)
            results[name] = {**spec, "clean_top1": 100.0 * clean / n, "robust_top1": 100.0 * robust / n,
                             "robust_top1_per_restart": [100.0 * c / n for c in per_restart], "n": n,
                             "batch_size": min(batch_size, n), "seconds": time.perf_counter() - start}
            if adaptation is not None:
                results[name].update(eot_samples=self.eot_samples, eot_loss=self.eot_loss,
                                     eot_max_bn_mean_spread=max(spreads) if spreads else 0.0)
            ctx.log({f"pgd/{name}/robust_top1": results[name]["robust_top1"]})
        return {"attacks": results, "adaptation": adaptation.describe() if adaptation is not None else None}

    def table(self, results):
        rows = []
        for name, r in results["attacks"].items():
            rows.append([name, r["norm"], f"{r['eps']:.4g}", r["steps"], f"{r['step_size']:.4g}", r["restarts"],
                         r["clean_top1"], r["robust_top1"], r["n"], f"{r['seconds']:.0f}"])
        how = "EoT-PGD over {m} BN-adapted copies ({loss}); ".format(
            m=next(iter(results["attacks"].values())).get("eot_samples"),
            loss=next(iter(results["attacks"].values())).get("eot_loss")) if results["adaptation"] else "PGD; "
        return (format_table(["attack", "norm", "eps", "steps", "step", "restarts", "clean top-1 %",
                              "robust top-1 %", "images", "s"], rows, precision=1)
                + f"\n{how}{results['adaptation'] or 'no adaptation'}; robust = correct on the clean image and "
                  "after every restart")

    def headline(self, results):
        return {f"robust_top1_{name}": r["robust_top1"] for name, r in results["attacks"].items()}

    def compare_rows(self, results):
        return [(f"robust {name}", r["robust_top1"]) for name, r in results["attacks"].items()]
