"""The prepared check for a machine with a GPU: one command, one JSON + one markdown report.

    bash scripts/gpu_check.sh            # writes bench/results/gpu_check.{json,md}; about 5-8 min on one GPU
    .venv/bin/python scripts/gpu_check.py --out docs/gpu_check.md   # the same, the markdown also to docs/

Parts (each one timed, with its peak GPU memory; a part that fails is reported and the others go on):

1. ``cuda_tests``: the tests of the suite that need CUDA (they skip on a CPU machine), via pytest.
2. ``engine_agreement``: every one of the 19 ImageNet-C corruptions at severity 3 on CUDA vs CPU, same
   images and seed: PSNR; deterministic corruptions must agree to >= 45 dB (random ones draw on their
   device's generator, so only their statistics can agree: reported, not judged; JPEG on CUDA runs
   the float-DCT pipeline, compared with that pipeline on the CPU).
3. ``engine_throughput``: images / s of each corruption at 224 px, batch 64, severity 3, and the
   projected time to generate ImageNet-C (15 + 4 corruptions x 5 severities x 50,000 images; the 75
   subsets of the 15 benchmark corruptions are reported separately).
4. ``resnet50_eval``: torchvision ResNet-50 (random weights: no download) evaluation throughput at
   224 px in bf16 autocast and channels_last, plain and with BN adaptation (robustexp's
   BatchNormAdaptation, partial N=16 and full), and the projection: ImageNet-C (75 subsets x 50,000)
   generated on the GPU and evaluated with BN adaptation, in minutes (goal: under 10 minutes).
5. ``amp_train_step``: one ResNet-50 SGD step in bf16 autocast (channels_last), seconds and memory.
6. ``ddp_nccl``: ``torchrun --nproc_per_node=1 -m robustexp`` on the GPU (nccl), a toy run; its
   metrics.json must say complete.
7. ``certify``: CERTIFY throughput (noisy samples / s) of the small CNN at 28 px and the CIFAR
   ResNet-18 at 32 px against the same model's bare forward throughput.

Without a GPU, the script says so at the top of the report, runs the CPU-side parts at small sizes
(engine throughput and the ResNet-50 evaluation on a few images, certification) so that the script
itself is tested, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustexp.data.corruptions._replay import natural_images  # noqa: E402
from robustexp.data.corruptions.engine import TorchCorruptionEngine  # noqa: E402
from robustexp.data.corruptions.names import ALL_CORRUPTIONS  # noqa: E402
from robustexp.data.corruptions.names import TEST_CORRUPTIONS as COMMON_CORRUPTIONS  # noqa: E402

DETERMINISTIC = ("defocus_blur", "glass_blur", "zoom_blur", "contrast", "brightness", "saturate",
                 "elastic_transform", "pixelate", "jpeg_compression", "gaussian_blur", "motion_blur")
IMAGENET_C_IMAGES = 50_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times of ``fn`` (after one warm-up call)."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------------ parts
def cuda_tests(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "no GPU: the CUDA tests skip on this machine"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
           "tests/test_corruption_engine.py", "tests/test_mnist_c.py", "tests/test_reliability.py",
           "tests/test_certify.py", "tests/test_adaptation.py"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {"command": " ".join(cmd[1:]), "returncode": result.returncode,
            "summary": (result.stdout.strip().splitlines() or [""])[-1], "ok": result.returncode == 0}


def engine_agreement(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "no GPU"}
    from robustexp.data.corruptions import engine as E
    from robustexp.data.corruptions._jpeg import jpeg_roundtrip

    engine = TorchCorruptionEngine()
    x = natural_images(4, 224, 224)
    rows = {}
    for name in ALL_CORRUPTIONS:
        gpu = engine(x.to(device), name, 3, 0).cpu()
        if name == "jpeg_compression":  # CPU uses Pillow; the GPU the float-DCT pipeline: compare pipelines
            cpu = E.finish(jpeg_roundtrip(torch.round(x * 255), E.JPEG_QUALITY[2]) / 255.0, 3, True)
        else:
            cpu = engine(x, name, 3, 0)
        value = psnr(gpu, cpu)
        rows[name] = {"psnr_db": value, "deterministic": name in DETERMINISTIC,
                      "ok": value >= 45 if name in DETERMINISTIC else None}
    judged = [r["ok"] for r in rows.values() if r["ok"] is not None]
    return {"per_corruption": rows, "ok": all(judged)}


def engine_throughput(device: torch.device, quick: bool) -> dict[str, Any]:
    batch = 64 if device.type == "cuda" else 8
    engine = TorchCorruptionEngine()
    x = natural_images(batch, 224, 224).to(device)
    rates = {}
    for name in ALL_CORRUPTIONS if not quick or device.type == "cuda" else COMMON_CORRUPTIONS[:5]:
        seconds = _time(lambda n=name: engine(x, n, 3, 0), device, repeats=2 if quick else 3)
        rates[name] = batch / seconds
    common = [n for n in COMMON_CORRUPTIONS if n in rates]
    # 5 severities x 50,000 images of each corruption, at the severity-3 rate
    hours = {name: 5 * IMAGENET_C_IMAGES / rate / 3600 for name, rate in rates.items()}
    out = {"batch": batch, "image_size": 224, "images_per_s": rates,
           "projected_hours_all_measured": sum(hours.values()),
           "projected_hours_75_subsets": sum(hours[n] for n in common) if len(common) == 15 else None}
    return out


def _resnet50(device: torch.device) -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None).to(device).eval().to(memory_format=torch.channels_last)


def resnet50_eval(device: torch.device, quick: bool, engine_rate: float | None = None) -> dict[str, Any]:
    from robustexp.adaptation.bn import BatchNormAdaptation

    batch = 256 if device.type == "cuda" else 8
    model = _resnet50(device)
    x = torch.rand(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def forward():
        with torch.no_grad(), autocast:  # the grad mode the evaluators use with and without adaptation
            model(x)

    rates = {"plain": batch / _time(forward, device, repeats=2 if quick else 5)}
    for label, adaptation in (("bn_partial_N16", BatchNormAdaptation(mode="prior", prior_strength=16,
                                                                     batch_size=batch)),
                              ("bn_full", BatchNormAdaptation(mode="full", batch_size=batch))):
        adaptation.attach(model)
        try:
            if adaptation.estimates_subset:  # one pass to estimate, then a frozen pass: as on a subset
                def run(a=adaptation):
                    with torch.no_grad(), autocast:
                        a.prepare_subset(model, [(x, None)], device)
                        model(x)
                        a.reset()
            else:
                def run(a=adaptation):
                    with torch.no_grad(), autocast:
                        model(x)
                        a.reset()
            rates[label] = batch / _time(run, device, repeats=2 if quick else 5)
        finally:
            adaptation.detach()
    total = 75 * IMAGENET_C_IMAGES
    out = {"batch": batch, "dtype": "bf16 autocast", "memory_format": "channels_last", "images_per_s": rates,
           "bn_partial_overhead_pct": 100 * (rates["plain"] / rates["bn_partial_N16"] - 1),
           # full adaptation passes over the subset twice (estimate, then predict): its baseline is 2 passes
           "bn_full_overhead_pct": 100 * (rates["plain"] / 2 / rates["bn_full"] - 1)}
    if engine_rate:
        minutes = (total / engine_rate + total / rates["bn_partial_N16"]) / 60
        out["projected_imagenet_c_minutes_generate_and_evaluate_bn"] = minutes
        out["goal_10_minutes_met"] = minutes <= 10 if device.type == "cuda" else None
    return out


def amp_train_step(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "no GPU"}
    import torch.nn.functional as F

    model = _resnet50(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(64, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (64,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss of the AMP step is {loss.item()}")

    seconds = _time(step, device, repeats=3)
    return {"batch": 64, "seconds_per_step": seconds, "images_per_s": 64 / seconds}


def ddp_nccl(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "no GPU"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port", "29531",
               "-m", "robustexp", "runtime.device=cuda", "logger.mode=disabled", "runtime.progress=false",
               "dataset.n_train=1000", "dataset.n_test=200", "trainer.epochs=1", "eval=clean", f"output_root={tmp}"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        metrics = list(Path(tmp).glob("runs/*/metrics.json"))
        status = json.loads(metrics[0].read_text()) if metrics else {}
    return {"returncode": result.returncode, "status": status.get("status"), "world_size": status.get("world_size"),
            "device": status.get("device"), "clean_top1": (status.get("summary") or {}).get("clean_top1"),
            "ok": result.returncode == 0 and status.get("status") == "complete",
            "tail": "" if result.returncode == 0 else (result.stdout + result.stderr)[-2000:]}


def _certify_one(net: torch.nn.Module, shape: tuple[int, ...], n: int, device: torch.device) -> dict[str, Any]:
    """CERTIFY's noisy samples / s on 4 images (n0 = 100, n noisy copies each) against the bare forward
    throughput of the same folded model at the same batch size, on noise-free inputs."""
    from robustexp.evaluation.certify import certify, fold_frozen_batchnorm
    from robustexp.models.build import NormalizedClassifier

    model = NormalizedClassifier(net, [0.5] * shape[0], [0.25] * shape[0]).to(device).eval()
    folded = fold_frozen_batchnorm(model)
    images = torch.rand(4, *shape, device=device)
    batch = 1000 if device.type == "cuda" else 250
    samples = len(images) * (100 + n)
    inputs = torch.rand(batch, *shape, device=device)

    def run_certify():
        with torch.inference_mode():
            certify(folded, images, 0.25, 100, n, 0.001, 10, batch,
                    generator=torch.Generator(device=device).manual_seed(0))

    def run_forward():
        with torch.inference_mode():
            for _ in range(math.ceil(samples / batch)):
                folded(inputs)

    certify_rate = samples / _time(run_certify, device, repeats=2)
    forward_rate = math.ceil(samples / batch) * batch / _time(run_forward, device, repeats=2)
    return {"noisy_samples_per_s": certify_rate, "bare_forward_per_s": forward_rate,
            "ratio": certify_rate / forward_rate, "batch": batch}


def certify_throughput(device: torch.device, quick: bool) -> dict[str, Any]:
    from robustexp.models.resnet_cifar import resnet18_cifar
    from robustexp.models.small_cnn import SmallCNN

    scale = 1 if device.type == "cuda" else 4  # fewer samples on a CPU
    return {"small_cnn_28px": _certify_one(SmallCNN(num_classes=10, in_channels=1), (1, 28, 28), 2000 // scale,
                                           device),
            "resnet18_cifar_32px": _certify_one(resnet18_cifar(num_classes=10), (3, 32, 32), 500 // scale, device)}


# ------------------------------------------------------------------------------------------------ driver
def run_part(name: str, fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    print(f"[gpu_check] {name} ...", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - a failing part is reported, the others go on
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(), "ok": False}
    result["seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"[gpu_check] {name}: {result.get('error') or result.get('skipped') or 'done'} "
          f"({result['seconds']:.1f} s)", flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# GPU check", "", f"`{report['command']}` on {report['date']}", ""]
    lines.append(f"**{env['gpu']}**" if env["gpu"] else "**No GPU found**: only the CPU-side parts ran, at small "
                 "sizes; the numbers below say nothing about a GPU.")
    lines += ["", f"torch {env['torch']}, CUDA {env['cuda']}, {env['cpu_threads']} CPU threads, python {env['python']}",
              "", "| part | result | seconds | peak GPU memory (GiB) |", "|---|---|---:|---:|"]
    for name, part in report["parts"].items():
        verdict = part.get("error") or part.get("skipped") or \
            {True: "ok", False: "FAILED", None: "measured"}[part.get("ok")]
        memory = f"{part['peak_gpu_memory_gib']:.2f}" if "peak_gpu_memory_gib" in part else ""
        lines.append(f"| {name} | {verdict} | {part['seconds']:.1f} | {memory} |")
    throughput = report["parts"].get("engine_throughput", {})
    if throughput.get("images_per_s"):
        lines += ["", f"## Corruption engine, 224 px, batch {throughput['batch']}, severity 3", "",
                  "| corruption | images / s |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in throughput["images_per_s"].items()]
        if throughput.get("projected_hours_75_subsets") is not None:
            lines.append(f"\nImageNet-C (75 subsets x 50,000 images) generated in "
                         f"{throughput['projected_hours_75_subsets'] * 60:.1f} min at these rates.")
    evaluation = report["parts"].get("resnet50_eval", {})
    if evaluation.get("images_per_s"):
        lines += ["", f"## ResNet-50 evaluation, batch {evaluation['batch']}, {evaluation['dtype']}, "
                  f"{evaluation['memory_format']}", "", "| | images / s |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in evaluation["images_per_s"].items()]
        lines.append(f"\nBN adaptation overhead: partial {evaluation['bn_partial_overhead_pct']:.1f} %, "
                     f"full {evaluation['bn_full_overhead_pct']:.1f} % (against two plain passes: it estimates "
                     "the statistics in one pass, then predicts).")
        if "projected_imagenet_c_minutes_generate_and_evaluate_bn" in evaluation:
            lines.append(f"ImageNet-C generated and evaluated with BN adaptation: "
                         f"{evaluation['projected_imagenet_c_minutes_generate_and_evaluate_bn']:.1f} min "
                         f"(goal: under 10 min).")
    cert = report["parts"].get("certify", {})
    rows = [(k, v) for k, v in cert.items() if isinstance(v, dict) and "ratio" in v]
    if rows:
        lines += ["", "## Certification", "", "| model | noisy samples / s | bare forward / s | ratio |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['noisy_samples_per_s']:.0f} | {v['bare_forward_per_s']:.0f} | {v['ratio']:.2f} |"
                  for k, v in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and corruptions (a smoke of the script)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of gpu_check.{json,md}")
    parser.add_argument("--out", default=None, help="also write the markdown report here (e.g. docs/gpu_check.md)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
           "host": platform.node()}
    print(f"[gpu_check] {'GPU: ' + env['gpu'] if env['gpu'] else 'no GPU found: running the CPU-side parts only'}",
          flush=True)
    parts: dict[str, dict[str, Any]] = {}
    parts["cuda_tests"] = run_part("cuda_tests", lambda: cuda_tests(device, args.quick), device)
    parts["engine_agreement"] = run_part("engine_agreement", lambda: engine_agreement(device, args.quick), device)
    parts["engine_throughput"] = run_part("engine_throughput", lambda: engine_throughput(device, args.quick), device)
    rates = parts["engine_throughput"].get("images_per_s") or {}
    common = [rates[n] for n in COMMON_CORRUPTIONS if n in rates]
    engine_rate = len(common) / sum(1 / r for r in common) if common else None  # harmonic mean: time per image
    parts["resnet50_eval"] = run_part("resnet50_eval", lambda: resnet50_eval(device, args.quick, engine_rate), device)
    parts["amp_train_step"] = run_part("amp_train_step", lambda: amp_train_step(device, args.quick), device)
    parts["ddp_nccl"] = run_part("ddp_nccl", lambda: ddp_nccl(device, args.quick), device)
    parts["certify"] = run_part("certify", lambda: certify_throughput(device, args.quick), device)
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "environment": env, "gpu_found": device.type == "cuda",
              "parts": parts}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (results / "gpu_check.md").write_text(text)
    if args.out:
        Path(args.out).write_text(text)
    print("\n" + text)
    failed = [k for k, v in parts.items() if v.get("ok") is False]
    if failed:
        print(f"[gpu_check] failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and device.type == "cuda" else 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    raise SystemExit(main())
