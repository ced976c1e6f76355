"""Training step time of the quantized methods against FP32 on the default MLP (issue 3).

For each dataset shape (the default MLP 128-128 on telco-churn: 40 inputs, 2 classes; letter: 16
inputs, 26 classes), times one training step (forward, loss with the method's cost term,
backward, Adam step, the method's ``after_step``) with :func:`mpqat.bench.measure_step_seconds`
for FP32, uniform LSQ W4A4, NMP-QAT with ``configs/nmp-budget.yaml`` and NMP-QAT with its
defaults. Every round times FP32 right before each recipe (interleaved, in one process), so the
ratio is robust to whatever else the machine is doing; the table gives the median over rounds of
the step time and of the per-round ratio, once per thread count.

    python benchmarks/step_time.py                     # 1 and 2 threads, writes benchmarks/step_time.md
    python benchmarks/step_time.py --threads 1 --rounds 3 --out /tmp/step.md
    python benchmarks/step_time.py --clock wall,cpu    # also with process CPU time

``--clock cpu`` runs the same measurement loop with the process's CPU time in place of the wall
clock (a ``clock`` column tells them apart): on a machine shared with other jobs, a step of many small kernels loses far more wall time
to preemption than FP32's few large ones, and the wall-clock ratio then measures the load. (With
more than one thread CPU time adds up the threads, spin-waits included, so ``cpu`` runs at 1 thread only.)

The models are freshly quantized (every NMP neuron at its lowest candidate): the quantized step
runs the same kernels whatever bits the neurons have. The data are the real training splits when
the dataset has been fetched (``mpqat data fetch``), otherwise random rows of the same shape.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import torch

from mpqat.bench import timing
from mpqat.bench.timing import cpu_count, measure_step_seconds
from mpqat.methods import hooks_for
from mpqat.methods.nmp import NeuronBits
from mpqat.models import build_model, model_spec
from mpqat.quantize import quantize
from mpqat.recipes import Uniform, load_recipe

ROOT = Path(__file__).resolve().parent
SHAPES = {"telco-churn": (40, 2), "letter": (16, 26)}


def _data(name: str, rows: int = 4096) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from mpqat.data import load_dataset

        splits = load_dataset(name, seed=0)
        return splits.X_train, splits.y_train, "training split"
    except Exception:  # not fetched (or no pandas): random rows of the same shape
        n_in, n_classes = SHAPES[name]
        rng = np.random.default_rng(0)
        return rng.normal(size=(rows, n_in)).astype(np.float32), rng.integers(0, n_classes, rows), "random rows"


class _CpuClock:
    """The ``time`` module as :mod:`mpqat.bench.timing` sees it, with ``perf_counter`` = process CPU time."""

    perf_counter = staticmethod(time.process_time)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@contextlib.contextmanager
def clock(kind: str) -> Iterator[None]:
    """``wall``: measure_step_seconds as it is; ``cpu``: the same loop timed with process CPU time."""
    if kind == "wall":
        yield
        return
    saved = timing.time
    timing.time = _CpuClock()  # type: ignore[assignment]
    try:
        yield
    finally:
        timing.time = saved


def _recipes() -> dict[str, object]:
    return {
        "uniform LSQ W4A4": Uniform(w_bits=4, a_bits=4),
        "NMP-QAT (nmp-budget.yaml)": load_recipe(ROOT.parent / "configs" / "nmp-budget.yaml"),
        "NMP-QAT (defaults)": NeuronBits(),
    }


def measure(name: str, threads: int, rounds: int, repeats: int, warmup: int, clock_kind: str) -> list[dict[str, object]]:
    """Per recipe: median step (ms) and median per-round ratio to the interleaved FP32 step."""
    X, y, source = _data(name)
    n_classes = int(y.max()) + 1
    torch.manual_seed(0)
    fp32 = build_model(model_spec("mlp", X.shape[1], max(n_classes, SHAPES[name][1])))
    models = {label: (quantize(fp32, recipe), hooks_for(recipe)) for label, recipe in _recipes().items()}
    timing = {"repeats": repeats, "warmup": warmup, "threads": threads}
    fp_times: list[float] = []
    steps: dict[str, list[float]] = {label: [] for label in models}
    ratios: dict[str, list[float]] = {label: [] for label in models}
    with clock(clock_kind):
        for _ in range(rounds):
            for label, (model, hooks) in models.items():
                fp = measure_step_seconds(fp32, X, y, **timing)
                step = measure_step_seconds(model, X, y, hooks=hooks, **timing)
                fp_times.append(fp)
                steps[label].append(step)
                ratios[label].append(step / fp)
    common = {"dataset": name, "threads": threads, "clock": clock_kind, "data": source}
    rows: list[dict[str, object]] = [{**common, "recipe": "FP32", "ms": 1e3 * statistics.median(fp_times), "ratio": 1.0}]
    for label in models:
        rows.append({**common, "recipe": label, "ms": 1e3 * statistics.median(steps[label]),
                     "ratio": statistics.median(ratios[label])})
    return rows


def markdown(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    lines = [
        "# Training step time vs FP32 (default MLP 128-128, batch 256, Adam)",
        "",
        f"Written by `python benchmarks/step_time.py` on {date.today().isoformat()}: "
        f"{platform.processor() or platform.machine()}, {cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}. "
        f"{args.rounds} rounds x {args.repeats} timed steps (after {args.warmup} "
        "warm-up steps) per recipe; each round times FP32 right before the recipe. Step: median over "
        "rounds of the median step; x FP32: median over rounds of the per-round ratio. Clock: `wall` is "
        "`measure_step_seconds` as it is (wall time); `cpu` times the same loop with the process's CPU time, "
        "which other jobs on a shared machine disturb much less (1 thread only).",
        "",
        "| dataset (inputs, classes) | clock | threads | recipe | step (ms) | x FP32 |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        n_in, n_classes = SHAPES[str(r["dataset"])]
        lines.append(f"| {r['dataset']} ({n_in}, {n_classes}) | {r['clock']} | {r['threads']} | {r['recipe']} | "
                     f"{r['ms']:.3f} | {r['ratio']:.2f} |")
    sources = sorted({f"{r['dataset']}: {r['data']}" for r in rows})
    lines += ["", "Data: " + "; ".join(sources) + "."]
    if args.note:
        lines += ["", args.note]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="telco-churn,letter", help="comma-separated: telco-churn, letter")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--clock", default="wall",
                        help="comma-separated: wall (measure_step_seconds as is), cpu (the same loop, process CPU time)")
    parser.add_argument("--note", default="", help="a line added under the table (e.g. how busy the machine was)")
    parser.add_argument("--out", type=Path, default=ROOT / "step_time.md")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}: choose from {', '.join(SHAPES)}")
    clocks = [c.strip() for c in args.clock.split(",") if c.strip()]
    if not clocks or any(c not in ("wall", "cpu") for c in clocks):
        parser.error(f"--clock {args.clock!r}: use wall, cpu or wall,cpu")
    rows: list[dict[str, object]] = []
    for clock_kind in clocks:
        for threads in (int(t) for t in args.threads.split(",")):
            if clock_kind == "cpu" and threads > 1:  # CPU time would add up the threads (and their spin-waits)
                print(f"skipping --clock cpu at {threads} threads: CPU time is a latency only with 1 thread")
                continue
            for name in names:
                for row in measure(name, threads, args.rounds, args.repeats, args.warmup, clock_kind):
                    print(f"{row['dataset']:12s} {row['clock']:4s} threads={row['threads']} {row['recipe']:28s} "
                          f"{row['ms']:7.3f} ms  x{row['ratio']:.2f}", flush=True)
                    rows.append(row)
    text = markdown(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
