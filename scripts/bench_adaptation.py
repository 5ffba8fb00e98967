"""Cost of test-time adaptation over plain evaluation (issue 21, item 3), measured side by side.

One model, one set of pre-made test images, one batch size n; every variant is evaluated with
``robustexp.evaluation.base.evaluate_subset`` exactly as the evaluators run it (statistics reset
before and after the subset, the adaptation attached once per variant as the runner does):

* ``plain``: the model as trained (``NoAdaptation``): ``evaluate_subset`` folds BN into the
  convolutions (``robustexp.models.folding``, a fresh fold per subset, its cost included) and
  forwards CPU batches in chunks of at most 128 images, as the runner does;
* ``unfolded``: the same model with its eval-mode BatchNorm layers (``evaluate_batches`` on the
  model itself): the network the adaptations run, whose statistics change per batch and cannot
  be folded; the ratio to it is the cost of the statistics alone;
* ``partial``: ``BatchNormAdaptation(mode="prior", prior_strength=N, batch_size=n)``
  (Schneider et al. eq. 3): the statistics of every test batch mixed with the source ones;
* ``full``: ``BatchNormAdaptation(mode="full")``: one pass over the subset that estimates the
  statistics, then a frozen pass that predicts (two forward passes by definition: the estimate
  needs every image before the first prediction), the prediction pass with the adapted BN folded
  and in chunks, as the plain model (``evaluate_subset``);
* ``tent``: ``TentAdaptation`` (Adam, one step per batch): forward, backward and an optimizer
  step per batch; its cost is reported, there is no target.

Rounds alternate the variants, each round starting one variant later (the machine may be
shared: load changes within a round fall on every variant in turn); per variant the best round and the
median over rounds of the ratio to the same round's plain time are reported. Target (issue 21):
partial and full at most 5 % over plain, counting for ``full`` the two forward passes it needs
("per forward pass": full time / (2 x plain time)).

The models run in channels_last on CPU as the runner does (``runtime.channels_last: auto``,
``robustexp.utils.model_memory_format``; ``--memory-format`` to choose). Models: the default
SmallCNN (width 32) at 28 px on the embedded digits, and the CIFAR ResNet-18
(``robustexp.models.resnet_cifar``) at 32 px on random images; BN statistics calibrated as after
training.

``--baseline REF`` adds ``partial@REF`` and ``full@REF``: the same variants with
``robustexp/adaptation/bn.py`` as it is at git revision REF (``git show``), timed in the same
rounds, so that a change is measured side by side with the code it replaces.

Writes bench/results/adaptation_overhead.json and .md and prints the table.

    .venv/bin/python scripts/bench_adaptation.py            # n = 8 and 64, 5 rounds, ~3-5 minutes on 2 cores
    .venv/bin/python scripts/bench_adaptation.py --quick    # n = 8, 3 rounds, ~1 minute
    .venv/bin/python scripts/bench_adaptation.py --baseline HEAD   # and bn.py of the last commit
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _bench import load_average, module_at_revision, run_meta

from robustexp.adaptation import BatchNormAdaptation, NoAdaptation, TentAdaptation
from robustexp.evaluation.base import EvalContext, evaluate_batches, evaluate_subset
from robustexp.models.build import NormalizedClassifier
from robustexp.models.folding import fold_frozen_batchnorm
from robustexp.models.resnet_cifar import resnet18_cifar
from robustexp.models.small_cnn import SmallCNN
from robustexp.utils import model_memory_format

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "unfolded", "partial", "full", "tent")
FORWARD_PASSES = {"plain": 1, "unfolded": 1, "partial": 1, "full": 2, "tent": 1}
TARGET_PERCENT = 5.0


def setup(model_name: str, n_images: int, seed: int = 0):
    """(model in eval mode with calibrated BN statistics, images in [0, 1], labels)."""
    torch.manual_seed(seed)
    if model_name == "smallcnn28":
        from robustexp.data.embedded import load_mnist5k

        images, labels = load_mnist5k()
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n_images]  # all classes
        images, labels = images[pick].float() / 255.0, labels[pick]
        model = NormalizedClassifier(SmallCNN(num_classes=10, in_channels=1, width=32), (0.1307,), (0.3081,))
    elif model_name == "resnet18_cifar32":
        generator = torch.Generator().manual_seed(seed)
        images = torch.rand(n_images, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (n_images,), generator=generator)
        model = NormalizedClassifier(resnet18_cifar(num_classes=10, in_channels=3),
                                     (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    else:
        raise ValueError(model_name)
    model.train()
    with torch.no_grad():
        for i in range(0, min(len(images), 256), 64):
            model(images[i:i + 64] * 0.8)   # running statistics that differ from the test batches
    return model.eval(), images, labels


def baseline_adaptation_class(ref: str):
    """``BatchNormAdaptation`` from ``robustexp/adaptation/bn.py`` at git revision ``ref``."""
    return module_at_revision("robustexp/adaptation/bn.py", ref, "bn_baseline").BatchNormAdaptation


def make_variant(name: str, n: int, prior_strength: float, baseline=None):
    if "@" in name:
        mode = name.split("@")[0]
        return (baseline(mode="prior", prior_strength=prior_strength, batch_size=n) if mode == "partial"
                else baseline(mode="full"))
    if name in ("plain", "unfolded"):
        return NoAdaptation()
    if name == "partial":
        return BatchNormAdaptation(mode="prior", prior_strength=prior_strength, batch_size=n)
    if name == "full":
        return BatchNormAdaptation(mode="full")
    if name == "tent":
        return TentAdaptation(optimizer="adam", lr=1e-3, batch_size=n)
    raise ValueError(name)


def fold_milliseconds(model, repeats: int = 3) -> float:
    """Best time to fold the model's BN (what ``evaluate_subset`` does once per plain subset)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fold_frozen_batchnorm(model.eval())
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def run_model(model_name: str, n_images: int, batch_sizes, rounds: int, prior_strength: float, log,
              baseline_ref: str | None = None, memory_format: str = "auto") -> list[dict]:
    model, images, labels = setup(model_name, n_images)
    with model_memory_format(model, memory_format, torch.device("cpu")) as layout:
        return _run_model(model, images, labels, model_name, n_images, batch_sizes, rounds, prior_strength,
                          log, baseline_ref, str(layout).replace("torch.", ""))


def _run_model(model, images, labels, model_name, n_images, batch_sizes, rounds, prior_strength, log,
               baseline_ref, layout) -> list[dict]:
    baseline = baseline_adaptation_class(baseline_ref) if baseline_ref else None
    variants = VARIANTS + ((f"partial@{baseline_ref}", f"full@{baseline_ref}") if baseline_ref else ())

    def make_batches(n):
        return ((images[i:i + n], labels[i:i + n]) for i in range(0, len(images), n))

    results = []
    for n in batch_sizes:
        adaptations = {name: make_variant(name, n, prior_strength, baseline) for name in variants}
        seconds = {name: [] for name in variants}
        top1 = {}
        for r in range(rounds + 1):          # round 0 warms up (kernels, allocator) and is not kept
            order = list(adaptations)
            order = order[r % len(order):] + order[:r % len(order)]   # each variant in every position in turn
            for name in order:
                adaptation = adaptations[name]
                if adaptation.adapts:
                    adaptation.attach(model)
                ctx = EvalContext(run_dir=Path("."), device=torch.device("cpu"), seed=0, progress=False,
                                  adaptation=adaptation)
                try:
                    start = time.perf_counter()
                    if name == "unfolded":   # eval-mode BN, unfolded: the network the adaptations run
                        result = evaluate_batches(model, make_batches(n), ctx.device, shard=True)
                    else:
                        result = evaluate_subset(model, make_batches, ctx, batch_size=n)
                    elapsed = time.perf_counter() - start
                finally:
                    if adaptation.adapts:
                        adaptation.detach()
                top1[name] = result["top1"]
                if r:
                    seconds[name].append(elapsed)
                    log(f"{model_name} n={n} round {r}/{rounds} {name:13s} {n_images / elapsed:9.1f} images/s")
        rows = {}
        for name in variants:
            ratios = [s / p for s, p in zip(seconds[name], seconds["plain"])]
            median_ratio = statistics.median(ratios)
            passes = FORWARD_PASSES[name.split("@")[0]]
            unfolded = statistics.median(s / u for s, u in zip(seconds[name], seconds["unfolded"]))
            rows[name] = {"seconds_best": min(seconds[name]), "seconds_per_round": seconds[name],
                          "images_per_second": n_images / min(seconds[name]),
                          "ratio_to_plain_per_round": ratios, "median_ratio_to_plain": median_ratio,
                          "forward_passes": passes,
                          "overhead_percent_per_forward_pass": 100.0 * (median_ratio / passes - 1.0),
                          "median_ratio_to_unfolded": unfolded,
                          "overhead_percent_per_forward_pass_over_unfolded": 100.0 * (unfolded / passes - 1.0),
                          "top1": top1[name]}
        results.append({"model": model_name, "images": n_images, "batch_size": n, "rounds": rounds,
                        "prior_strength": prior_strength, "memory_format": layout,
                        "fold_ms_per_subset": fold_milliseconds(model), "rows": rows,
                        "adaptation": {name: a.describe() for name, a in adaptations.items() if a.adapts}})
    return results


def markdown(results, meta) -> str:
    lines = [f"# Test-time adaptation cost over plain evaluation ({meta['date']})", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; load average before "
             f"{meta['load_before']}, after {meta['load_after']}. ``evaluate_subset`` as the evaluators run it, "
             f"models in {results[0]['memory_format']}; plain = BN folded into the convolutions (as the runner "
             "evaluates the unadapted model; the fold, once per subset, is included: "
             + ", ".join(f"{r['model']} {r['fold_ms_per_subset']:.0f} ms" for r in results[::len(results) // 2 or 1])
             + "), unfolded = the same network with eval-mode BN (the network the adaptations run). Ratio = "
             "median over rounds of (variant time / the same round's plain or unfolded time); overhead per "
             "forward pass = ratio / forward passes - 1 (full needs two: estimate, then predict). Target: "
             f"partial and full <= {TARGET_PERCENT:g} % per forward pass over plain; Tent: reported.", "",
             f"Command: `.venv/bin/python {meta['command']}`", "",
             "| model | n | variant | images/s (best round) | time / plain (median) | forward passes | "
             "overhead per forward pass | over unfolded, per pass | top-1 % |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for name, row in r["rows"].items():
            lines.append(f"| {r['model']} | {r['batch_size']} | {name} | {row['images_per_second']:.0f} | "
                         f"{row['median_ratio_to_plain']:.3f} | {row['forward_passes']} | "
                         f"{row['overhead_percent_per_forward_pass']:+.1f} % | "
                         f"{row['overhead_percent_per_forward_pass_over_unfolded']:+.1f} % | {row['top1']:.1f} |")
    lines += ["", f"partial: prior N = {results[0]['prior_strength']:g}, n = the batch size; full: statistics of "
              "the whole subset, then frozen; tent: Adam lr 1e-3, one step per batch, continual."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 8 only, 3 rounds, fewer images (~1 min)")
    parser.add_argument("--models", default="smallcnn28,resnet18_cifar32")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated n (default 8,64; --quick: 8)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--prior-strength", type=float, default=16.0, help="partial adaptation's N")
    parser.add_argument("--images", default=None,
                        help="images per model: N, or smallcnn28=N,resnet18_cifar32=M (default 1024 / 128)")
    parser.add_argument("--baseline", default=None, metavar="REF",
                        help="also time partial and full with robustexp/adaptation/bn.py at git revision REF")
    parser.add_argument("--memory-format", default="auto", choices=("auto", "channels_last", "contiguous"),
                        help="layout of the model (auto: channels_last on CPU, as the runner)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8" if args.quick else "8,64")).split(",")]
    rounds = args.rounds or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = {"smallcnn28": 256 if args.quick else 1024, "resnet18_cifar32": 64 if args.quick else 128}
    if args.images and "=" in args.images:
        images.update({k: int(v) for k, v in (item.split("=") for item in args.images.split(","))})
    elif args.images:
        images = dict.fromkeys(images, int(args.images))
    meta = run_meta("bench_adaptation.py", args.quick, argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.perf_counter()
    results = []
    for model_name in args.models.split(","):
        results += run_model(model_name, images[model_name], batch_sizes, rounds, args.prior_strength, log,
                             args.baseline, args.memory_format)
    meta["runtime_s"] = round(time.perf_counter() - started, 1)
    meta["load_after"] = load_average()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "adaptation_overhead"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "target_percent": TARGET_PERCENT,
                                                  "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    (out / f"{name}.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
