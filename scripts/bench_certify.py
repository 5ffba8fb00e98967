"""Throughput of randomized-smoothing certification (Cohen et al. 2019, CERTIFY): the batched
implementation of ``robustexp.evaluation.certify`` against a straightforward loop that certifies
one image at a time, at the same n0, n, alpha and forward batch size, on the same model.

The straightforward loop is written the way the reference code of Cohen et al. reads: per image,
n0 then n noisy copies in forward passes of at most ``batch`` copies of that image, predictions
counted in Python, then the Clopper-Pearson bound. The batched version puts several images in a
forward pass (``images_per_batch`` x ``batch // images_per_batch`` copies) and counts with one
``bincount``. It is timed as the evaluator runs it by default (CPU: channels_last layout and the
frozen BN layers folded into the convolutions) and with each of these switched off, so the table
shows where the time goes. Rounds of the two
implementations alternate (the machine may be shared), and the best round of each is kept.

Throughput = noisy samples (n0 + n per image) per second. The model is the default SmallCNN
(width 32) on 28x28 digits with BN statistics frozen (eval mode).

Writes bench/results/certify_throughput.json and .md and prints the table.

    .venv/bin/python scripts/bench_certify.py            # 20 images, n = 1,000, 3 rounds, ~4-8 minutes on 2 cores
    .venv/bin/python scripts/bench_certify.py --quick    # 10 images, 2 rounds, ~1-2 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from robustexp.evaluation.certify import (
    ABSTAIN,
    certified_radius,
    certify,
    clopper_pearson_lower,
    fold_frozen_batchnorm,
)
from robustexp.models.build import NormalizedClassifier
from robustexp.models.small_cnn import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CPU = "batched, channels_last, BN folded (evaluator default on CPU)"
DEFAULT_GPU = "batched, BN folded (evaluator default on GPU)"


def digits(k: int) -> torch.Tensor:
    from robustexp.data.embedded import load_mnist5k

    return load_mnist5k()[0][:k].float() / 255.0


def bench_model(seed: int = 0) -> NormalizedClassifier:
    """The default SmallCNN with BN statistics calibrated on digits (as after training), eval mode."""
    torch.manual_seed(seed)
    model = NormalizedClassifier(SmallCNN(num_classes=10, in_channels=1, width=32), (0.1307,), (0.3081,))
    model.train()
    with torch.no_grad():
        model(digits(256))
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def time_batched(model, images, sigma, n0, n, alpha, batch, device, memory_format, fold_bn
                 ) -> tuple[float, list[int]]:
    """The evaluator's CERTIFY: ``images_per_batch = batch // n0`` images per forward pass, optionally
    in channels_last and with the frozen BN layers folded (both set up inside the timing)."""
    k = max(1, batch // n0)   # the evaluator's default images_per_batch
    generator = torch.Generator(device=device).manual_seed(0)
    _sync(device)
    t = time.perf_counter()
    if memory_format is torch.channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        base = fold_frozen_batchnorm(model) if fold_bn else model
        predictions = []
        for g in range(0, len(images), k):
            out = certify(base, images[g:g + k], sigma, n0, n, alpha, 10, batch, generator, memory_format)
            predictions += out["prediction"].tolist()
        _sync(device)
        return time.perf_counter() - t, predictions
    finally:
        model.to(memory_format=torch.contiguous_format)


def run_device(device: torch.device, n_images: int, n0: int, n: int, alpha: float, sigma: float, batch: int,
               rounds: int, log) -> dict:
    model = bench_model().to(device)
    images = digits(n_images).to(device)
    warm = images[:2]
    time_loop(model, warm, sigma, n0, min(n, batch), alpha, batch, device)   # warm-up (kernels, primitives)
    default = DEFAULT_CPU if device.type == "cpu" else DEFAULT_GPU
    settings = {"batched": (torch.contiguous_format, False)}
    if device.type == "cpu":
        settings.update({"batched, channels_last": (torch.channels_last, False),
                         "batched, BN folded": (torch.contiguous_format, True),
                         DEFAULT_CPU: (torch.channels_last, True)})
    else:
        settings[DEFAULT_GPU] = (torch.contiguous_format, True)
    variants = {"one image at a time": lambda: time_loop(model, images, sigma, n0, n, alpha, batch, device)}
    for name, (memory_format, fold) in settings.items():
        variants[name] = lambda f=memory_format, b=fold: time_batched(model, images, sigma, n0, n, alpha, batch,
                                                                      device, f, b)
        time_batched(model, warm, sigma, n0, min(n, batch), alpha, batch, device, memory_format, fold)  # warm-up
    per_round, predictions = {name: [] for name in variants}, {}
    for r in range(rounds):
        for name, fn in variants.items():
            seconds, predictions[name] = fn()
            per_round[name].append(seconds)
            log(f"{device.type} round {r + 1}/{rounds} {name:45s} {n_images * (n0 + n) / seconds:9.0f} samples/s")
    samples = n_images * (n0 + n)
    rows = {name: {"seconds": min(s), "samples_per_second": samples / min(s),
                   "samples_per_second_per_round": [samples / x for x in s]} for name, s in per_round.items()}
    loop = rows["one image at a time"]
    for row in rows.values():
        row["speedup"] = row["samples_per_second"] / loop["samples_per_second"]
        # the same round's loop timing, taken just before: robust to the load of a shared machine changing
        row["speedup_per_round"] = [a / b for a, b in zip(row["samples_per_second_per_round"],
                                                          loop["samples_per_second_per_round"])]
        row["median_speedup_per_round"] = float(np.median(row["speedup_per_round"]))
    reference = np.array(predictions["one image at a time"])
    agreement = float(np.mean(np.array(predictions[default]) == reference))
    return {"device": str(device), "images": n_images, "n0": n0, "n": n, "alpha": alpha, "sigma": sigma,
            "batch": batch, "rounds": rounds, "rows": rows, "default": default,
            "speedup": rows[default]["speedup"], "median_speedup_per_round": rows[default]["median_speedup_per_round"],
            "prediction_agreement": agreement}


def markdown(results, meta) -> str:
    lines = [f"# Certification throughput ({meta['date']})", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads. CERTIFY (Cohen et al.) "
             f"on the default SmallCNN (width 32, 28x28 digits); noisy samples (n0 + n per image) per second, best "
             f"of the rounds (the implementations alternate within a round); speedup = best vs best, and the "
             f"median over rounds of the ratio to the same round's loop.", ""]
    for r in results:
        lines += [f"## {r['device']}: {r['images']} images, n0={r['n0']}, n={r['n']}, alpha={r['alpha']}, "
                  f"sigma={r['sigma']}, forward batch {r['batch']}", "",
                  "| implementation | seconds | samples/s | speedup | median per-round speedup | per round |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, row in r["rows"].items():
            bold = "**" if name == r["default"] else ""
            rounds = ", ".join(f"{x:.2f}" for x in row["speedup_per_round"])
            lines.append(f"| {name} | {row['seconds']:.1f} | {row['samples_per_second']:.0f} | "
                         f"{bold}{row['speedup']:.2f}x{bold} | {row['median_speedup_per_round']:.2f}x | {rounds} |")
        lines += ["", f"Same CERTIFY answer (class or abstain) as the loop on {100 * r['prediction_agreement']:.0f}% "
                      "of the images (independent noise draws).", ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 images, 2 rounds (~1-2 min)")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--n", type=int, default=1000, help="CERTIFY's n (default 1,000)")
    parser.add_argument("--batch", type=int, default=1000, help="noisy samples per forward pass (default 1,000)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    n_images, rounds = (10, 2) if args.quick else (20, 3)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and not args.no_cuda
                                       else [])
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "quick": args.quick}
    log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.perf_counter()
    results = []
    for device in devices:
        r = run_device(device, n_images, 100, args.n, 0.001, 0.5, args.batch, rounds, log)
        log(f"{device.type}: batched certification {r['speedup']:.2f}x the one-image loop (best vs best; median "
            f"per round {r['median_speedup_per_round']:.2f}x; {r['default']})")
        results.append(r)
    meta["runtime_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "certify_throughput"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    (out / f"{name}.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
