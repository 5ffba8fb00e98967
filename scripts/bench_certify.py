"""Throughput of randomized-smoothing certification (Cohen et al. 2019, CERTIFY) against the bare
forward pass of the same model (issue 21, item 2), measured side by side.

* bare forward: the model as the evaluator certifies with it (eval mode, the frozen BN layers
  folded into the convolutions, ``robustexp.evaluation.certify.fold_frozen_batchnorm``, and on
  CPU the channels_last layout), on pre-made random inputs in that layout, no noise, no
  counting, under ``torch.inference_mode``; the best of a few batch sizes.
* CERTIFY: ``robustexp.evaluation.certify.certify`` as the evaluator runs it: groups of
  ``images_per_batch = batch // n0`` images, a generator seeded per group, n0 then n noisy
  samples per image in forward passes of ``batch`` samples; throughput = noisy samples
  (n0 + n per image) per second.
* ``--baseline REF``: CERTIFY with ``robustexp/evaluation/certify.py`` as it is at git revision
  REF (``git show``), in the same rounds: a change measured side by side with what it replaces
  (a revision whose ``certify`` has no ``forward_batch_size`` runs its forward passes at ``batch``).
* ``--loop``: the straightforward one-image-at-a-time loop of the reference code (the previous
  bench's comparison): per image, n0 then n noisy copies, predictions counted in Python.

Target (issue 21): CERTIFY's noisy-sample throughput >= 90 % of the bare forward throughput at
its best batch size. Rounds alternate the implementations (the machine may be shared); the
ratio reported is the median over rounds of (CERTIFY / the same round's best bare forward), next
to best vs best.

Models: the default SmallCNN (width 32) at 28 px on the embedded digits and the CIFAR ResNet-18
(``robustexp.models.resnet_cifar``) at 32 px on random images, BN statistics calibrated (as
after training), eval mode.

Writes bench/results/certify_throughput.json and .md and prints the table.

    .venv/bin/python scripts/bench_certify.py            # 3 rounds, ~7 minutes on 2 shared cores
    .venv/bin/python scripts/bench_certify.py --quick    # 2 rounds, fewer samples, ~3 minutes
    .venv/bin/python scripts/bench_certify.py --baseline HEAD --loop
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _bench import load_average, module_at_revision, run_meta

from robustexp.evaluation.certify import (
    ABSTAIN,
    certified_radius,
    certify,
    clopper_pearson_lower,
    fold_frozen_batchnorm,
    forward_batch_for,
)
from robustexp.models.build import NormalizedClassifier
from robustexp.models.resnet_cifar import resnet18_cifar
from robustexp.models.small_cnn import SmallCNN
from robustexp.utils import derive_seed

ROOT = Path(__file__).resolve().parents[1]
# per model: input shape, CERTIFY's forward batch and n, bare-forward batch sizes tried, samples per bare timing
SETTINGS = {
    "smallcnn28": {"shape": (1, 28, 28), "batch": 1000, "n": 400, "images": 10, "bare": (100, 250, 500, 1000),
                   "bare_samples": 2000},
    # ResNet-18 on CPU: ~15-30 samples/s on 2 shared cores, so fewer samples (CERTIFY of 2 images, n = 100)
    "resnet18_cifar32": {"shape": (3, 32, 32), "batch": 200, "n": 100, "images": 2, "bare": (50, 100, 200),
                         "bare_samples": 200},
}


def digits(k: int) -> torch.Tensor:
    from robustexp.data.embedded import load_mnist5k

    return load_mnist5k()[0][:k].float() / 255.0


def bench_model(name: str, seed: int = 0) -> tuple[NormalizedClassifier, torch.Tensor]:
    """(model with BN statistics calibrated as after training, in eval mode; 64 test images)."""
    torch.manual_seed(seed)
    if name == "smallcnn28":
        model = NormalizedClassifier(SmallCNN(num_classes=10, in_channels=1, width=32), (0.1307,), (0.3081,))
        images = digits(256)
    else:
        model = NormalizedClassifier(resnet18_cifar(num_classes=10, in_channels=3), (0.4914, 0.4822, 0.4465),
                                     (0.2470, 0.2435, 0.2616))
        images = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    model.train()
    with torch.no_grad():
        for i in range(0, 256, 64):
            model(images[i:i + 64])
    return model.eval(), images[-64:]


def baseline_certify(ref: str):
    """``certify`` from ``robustexp/evaluation/certify.py`` at git revision ``ref``."""
    return module_at_revision("robustexp/evaluation/certify.py", ref, "certify_baseline").certify


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_bare(model, inputs: torch.Tensor, repeats: int, device) -> float:
    """Seconds for ``repeats`` forward passes of the pre-made batch ``inputs``."""
    model(inputs)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        model(inputs)
    _sync(device)
    return time.perf_counter() - t


def time_certify(certify_fn, model, images, sigma, n0, n, alpha, batch, device, memory_format
                 ) -> tuple[float, list[int]]:
    """The evaluator's CERTIFY loop (``CertifyEvaluator._certify_all`` without data loading and
    files): groups of ``batch // n0`` images, each with its own seeded generator."""
    k = max(1, batch // n0)
    predictions = []
    _sync(device)
    t = time.perf_counter()
    for g in range(0, len(images), k):
        generator = torch.Generator(device=device).manual_seed(derive_seed(0, "certify", sigma, g))
        out = certify_fn(model, images[g:g + k], sigma, n0, n, alpha, 10, batch, generator, memory_format)
        predictions += out["prediction"].tolist()
    _sync(device)
    return time.perf_counter() - t, predictions


@torch.no_grad()
def certify_one_image_at_a_time(model, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float,
                                num_classes: int, batch: int) -> tuple[int, float]:
    """The straightforward CERTIFY of one image (prediction, radius): n0 and then n noisy copies of
    ``x`` in forward passes of at most ``batch``, each prediction counted in a Python loop."""

    def sample(num):
        counts = np.zeros(num_classes, dtype=np.int64)
        remaining = num
        while remaining > 0:
            size = min(batch, remaining)
            copies = x.unsqueeze(0).repeat(size, 1, 1, 1)
            predictions = model(copies + torch.randn_like(copies) * sigma).argmax(1)
            for p in predictions.cpu().numpy():
                counts[p] += 1
            remaining -= size
        return counts

    top = int(sample(n0).argmax())
    pa_lower = float(clopper_pearson_lower(sample(n)[top], n, alpha))
    if pa_lower < 0.5:
        return ABSTAIN, float("nan")
    return top, float(certified_radius(pa_lower, sigma))


def time_loop(model, images, sigma, n0, n, alpha, batch, device) -> tuple[float, list[int]]:
    _sync(device)
    t = time.perf_counter()
    predictions = [certify_one_image_at_a_time(model, x, sigma, n0, n, alpha, 10, batch)[0] for x in images]
    _sync(device)
    return time.perf_counter() - t, predictions


def run_model(name: str, device: torch.device, rounds: int, quick: bool, baseline_ref: str | None, loop: bool,
              log) -> dict:
    cfg = dict(SETTINGS[name])
    n0, alpha, sigma, batch = 100, 0.001, 0.5, cfg["batch"]
    n = cfg["n"] // 2 if quick else cfg["n"]
    model, test_images = bench_model(name)
    model = model.to(device)
    images = test_images[:cfg["images"]].to(device)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format  # memory_format=auto
    model.to(memory_format=memory_format)
    folded = fold_frozen_batchnorm(model)                                                # fold_bn=true
    bare_inputs = {b: torch.rand(b, *cfg["shape"], device=device).contiguous(memory_format=memory_format)
                   for b in cfg["bare"]}
    bare_repeats = {b: max(1, cfg["bare_samples"] // b) for b in cfg["bare"]}
    implementations = {"CERTIFY": lambda: time_certify(certify, folded, images, sigma, n0, n, alpha, batch, device,
                                                       memory_format)}
    if baseline_ref:
        old = baseline_certify(baseline_ref)
        implementations[f"CERTIFY@{baseline_ref}"] = lambda: time_certify(old, folded, images, sigma, n0, n, alpha,
                                                                          batch, device, memory_format)
    if loop:
        implementations["one image at a time"] = lambda: time_loop(folded, images, sigma, n0, n, alpha, batch, device)
    samples = len(images) * (n0 + n)
    time_certify(certify, folded, images[:1], sigma, n0, min(n, batch), alpha, batch, device, memory_format)  # warm-up
    bare = {b: [] for b in cfg["bare"]}
    timed = {key: [] for key in implementations}
    predictions = {}
    for r in range(rounds):
        for b, x in bare_inputs.items():
            seconds = time_bare(folded, x, bare_repeats[b], device)
            bare[b].append(b * bare_repeats[b] / seconds)
            log(f"{name} {device.type} round {r + 1}/{rounds} bare forward, batch {b:5d} {bare[b][-1]:9.1f} samples/s")
        for key, fn in implementations.items():
            seconds, predictions[key] = fn()
            timed[key].append(samples / seconds)
            log(f"{name} {device.type} round {r + 1}/{rounds} {key:28s} {timed[key][-1]:9.1f} samples/s")
    best_bare_per_round = [max(bare[b][r] for b in bare) for r in range(rounds)]
    best_batch = max(bare, key=lambda b: max(bare[b]))
    rows = {}
    for key, per_round in timed.items():
        ratios = [c / f for c, f in zip(per_round, best_bare_per_round)]
        rows[key] = {"samples_per_second": max(per_round), "samples_per_second_per_round": per_round,
                     "ratio_to_bare_per_round": ratios, "median_ratio_to_bare": float(np.median(ratios)),
                     "ratio_best_vs_best": max(per_round) / max(best_bare_per_round)}
    agreement = None
    if baseline_ref:
        agreement = float(np.mean(np.array(predictions["CERTIFY"]) == np.array(predictions[f"CERTIFY@{baseline_ref}"])))
    return {"model": name, "device": str(device), "images": len(images), "n0": n0, "n": n, "alpha": alpha,
            "sigma": sigma, "batch": batch, "images_per_batch": max(1, batch // n0), "rounds": rounds,
            "forward_batch": forward_batch_for(device, batch),
            "memory_format": str(memory_format).removeprefix("torch."),
            "bare": {str(b): {"samples_per_second": max(v), "samples_per_second_per_round": v}
                     for b, v in bare.items()},
            "best_bare_batch": best_batch, "best_bare_samples_per_second": max(best_bare_per_round),
            "rows": rows, "same_predictions_as_baseline": agreement}


def markdown(results, meta) -> str:
    lines = [f"# Certification throughput against the bare forward pass ({meta['date']})", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; load average before "
             f"{meta['load_before']}, after {meta['load_after']}.", "",
             f"Command: `.venv/bin/python {meta['command']}`", "",
             "Noisy samples per second. Bare forward: the folded eval-mode model on pre-made inputs, best batch "
             "size; CERTIFY as the evaluator runs it. Ratio = median over rounds of CERTIFY / the same round's best "
             "bare forward (best vs best in brackets). Target >= 0.90.", "",
             "| model | device | bare forward (best batch) | implementation | samples/s | ratio to bare |",
             "|---|---|---:|---|---:|---:|"]
    for r in results:
        for key, row in r["rows"].items():
            lines.append(f"| {r['model']} | {r['device']} | {r['best_bare_samples_per_second']:.0f} "
                         f"(batch {r['best_bare_batch']}) | {key} | {row['samples_per_second']:.0f} | "
                         f"**{row['median_ratio_to_bare']:.3f}** ({row['ratio_best_vs_best']:.3f}) |")
    lines += ["", "| model | CERTIFY setting | bare forward samples/s by batch size |", "|---|---|---|"]
    for r in results:
        by_batch = ", ".join(f"{b}: {v['samples_per_second']:.0f}" for b, v in r["bare"].items())
        lines.append(f"| {r['model']} | {r['images']} images, n0={r['n0']}, n={r['n']}, sigma={r['sigma']}, forward "
                     f"batch {r['batch']} ({r['images_per_batch']} images x {r['batch'] // r['images_per_batch']} "
                     f"copies) in forward passes of {r['forward_batch']}, {r['memory_format']}, BN folded | "
                     f"{by_batch} |")
    same = [r for r in results if r["same_predictions_as_baseline"] is not None]
    if same:
        lines += ["", "Same CERTIFY answers as the baseline revision (same seeds): "
                  + ", ".join(f"{r['model']} {100 * r['same_predictions_as_baseline']:.0f} %" for r in same)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, half of n (~3 min)")
    parser.add_argument("--models", default="smallcnn28,resnet18_cifar32")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--baseline", default=None, metavar="REF",
                        help="also time CERTIFY of robustexp/evaluation/certify.py at git revision REF")
    parser.add_argument("--loop", action="store_true", help="also time the one-image-at-a-time loop")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and not args.no_cuda
                                       else [])
    meta = run_meta("bench_certify.py", args.quick, argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.perf_counter()
    results = []
    for device in devices:
        for name in args.models.split(","):
            r = run_model(name, device, rounds, args.quick, args.baseline, args.loop, log)
            log(f"{name} {device.type}: CERTIFY at {r['rows']['CERTIFY']['median_ratio_to_bare']:.3f} of the bare "
                f"forward (median per round; best bare batch {r['best_bare_batch']})")
            results.append(r)
    meta["runtime_s"] = round(time.perf_counter() - started, 1)
    meta["load_after"] = load_average()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "certify_throughput"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "target_ratio": 0.9, "results": results}, indent=2)
                                      + "\n")
    table = markdown(results, meta)
    (out / f"{name}.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
