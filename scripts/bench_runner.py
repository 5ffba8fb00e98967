"""Runner overhead: training and evaluation throughput of robustexp against a bare PyTorch loop.

Same model (the embedded default's small CNN, or ``--model resnet18_cifar``), same data (the
embedded digits), same batch size, optimizer and number of steps. The bare loop is what a
researcher would write by hand: a shuffled DataLoader, forward, cross-entropy, backward, SGD step;
for evaluation, a no-grad forward pass over the test set counting correct predictions. The runner
side is ``Trainer.fit`` with ``StandardTraining`` (checkpoint every epoch, seeded order, progress
bar, NaN check, logged accuracy) and the clean evaluator (fixed evaluation order, loss, top-5 and
calibration statistics; its reliability-diagram PNG, written once per run, is switched off).

The two are timed alternately, ``--repeats`` times each, and the median is reported, so machine
load affects both alike. Goal (issue 9): runner overhead at most 10 %.

Writes bench/results/runner.json and bench/results/runner.md.

    .venv/bin/python scripts/bench_runner.py           # ~2 minutes
    .venv/bin/python scripts/bench_runner.py --quick   # ~30 s
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from robustexp.config import instantiate_component
from robustexp.evaluation.base import EvalContext
from robustexp.main import CONFIG_DIR
from robustexp.methods.standard import StandardTraining
from robustexp.models.build import build_model
from robustexp.training.trainer import TrainContext, Trainer

ROOT = Path(__file__).resolve().parents[1]


def _setup(model_name: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}", "eval=clean"])
    data = instantiate_component(cfg.dataset)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_classes, data.mean, data.std)
    return cfg, data, model


def bare_train(model, dataset, batch_size: int, epochs: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    model.train()
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n += len(labels)
    return n / (time.perf_counter() - start)


def runner_train(model, dataset, batch_size: int, epochs: int) -> float:
    trainer = Trainer(epochs=epochs, batch_size=batch_size, optimizer=lambda params: torch.optim.SGD(
        params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
    with tempfile.TemporaryDirectory() as run_dir:
        ctx = TrainContext(run_dir=Path(run_dir), device=torch.device("cpu"), seed=0, progress=True)
        start = time.perf_counter()
        result = trainer.fit(model, StandardTraining(), dataset, ctx)
        seconds = time.perf_counter() - start
    steps = epochs * (len(dataset) // batch_size)
    assert len(result["history"]) == epochs
    return steps * batch_size / seconds


def bare_eval(model, dataset, batch_size: int) -> float:
    model.eval()
    correct, n, start = 0, 0, time.perf_counter()
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            correct += (model(images).argmax(1) == labels).sum().item()
            n += len(labels)
    return n / (time.perf_counter() - start)


def runner_eval(model, data, evaluator) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        ctx = EvalContext(run_dir=Path(run_dir), device=torch.device("cpu"), seed=0, progress=True)
        start = time.perf_counter()
        result = evaluator.evaluate(model, data, ctx)
        return result["n"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and one epoch")
    parser.add_argument("--model", default="small_cnn", help="model config (small_cnn | resnet18_cifar)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    epochs = 1 if args.quick else 2
    cfg, data, model = _setup(args.model)
    train_set = data.train
    if args.model != "small_cnn":  # ResNet-18 on CPU: a slice keeps the bench to minutes
        train_set = torch.utils.data.Subset(train_set, range(512))
    # the evaluation loop itself; the reliability-diagram PNG (about 0.3 s, once per run) is left out
    evaluator = instantiate_component(cfg.eval.evaluators.clean, reliability_diagram=False)
    batch = int(cfg.trainer.batch_size)
    timings = {"bare_train": [], "runner_train": [], "bare_eval": [], "runner_eval": []}
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for r in range(repeats):
        print(f"[bench] repeat {r + 1}/{repeats}", flush=True)
        for name, fn in (("bare_train", lambda: bare_train(model, train_set, batch, epochs)),
                         ("runner_train", lambda: runner_train(model, train_set, batch, epochs))):
            model.load_state_dict(initial)
            timings[name].append(fn())
        timings["bare_eval"].append(bare_eval(model, data.test, int(cfg.eval.evaluators.clean.batch_size)))
        timings["runner_eval"].append(runner_eval(model, data, evaluator))
    median = {k: statistics.median(v) for k, v in timings.items()}
    overhead = {phase: 100.0 * (median[f"bare_{phase}"] / median[f"runner_{phase}"] - 1.0)
                for phase in ("train", "eval")}
    result = {"model": args.model, "threads": args.threads, "batch_size": batch, "epochs": epochs,
              "repeats": repeats, "images_per_s": timings, "median_images_per_s": median,
              "overhead_percent": overhead, "goal_overhead_percent": 10.0,
              "machine": platform.platform(), "torch": torch.__version__,
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    lines = [f"# Runner overhead ({args.model}, {args.threads} threads, batch {batch}, median of {repeats})", "",
             "| phase | bare loop img/s | runner img/s | overhead % |", "|---|---:|---:|---:|"]
    for phase in ("train", "eval"):
        lines.append(f"| {phase} | {median[f'bare_{phase}']:.0f} | {median[f'runner_{phase}']:.0f} | "
                     f"{overhead[phase]:+.1f} |")
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"runner_{args.model}.json").write_text(json.dumps(result, indent=2))
    (out / f"runner_{args.model}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
