"""Wall time of `mpqat train` on 1 process vs N processes (torchrun, gloo) on this machine.

    python benchmarks/distributed/speed.py --dataset adult --method nmp --epochs 5 --nproc 2

Runs the same training (same global batch) once per process count, one after the other, and writes
``benchmarks/distributed/speed.md`` and ``speed.json`` with wall seconds, train seconds (the
trainer's own timer, epochs only), speed-up and the final test accuracy of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(nproc: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mpqat", "train", "--dataset", args.dataset, "--method", args.method,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--patience", "1000",
           "--out", str(out), "--force", "--quiet"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    return {"nproc": nproc, "wall_seconds": wall, "train_seconds": metrics["train_seconds"],
            "test_accuracy": metrics["test_accuracy"], "world_size": metrics.get("world_size", 1),
            "rank_divergence": metrics.get("rank_divergence", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="adult")
    parser.add_argument("--method", default="nmp")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.nproc):
            rows.append(run(n, args, Path(tmp) / f"p{n}"))
            print(rows[-1], flush=True)
    base = rows[0]["train_seconds"]
    for row in rows:
        row["speedup_train"] = base / row["train_seconds"]
    info = {"dataset": args.dataset, "method": args.method, "epochs": args.epochs, "batch_size": args.batch_size,
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "rows": rows}
    (HERE / "speed.json").write_text(json.dumps(info, indent=2))
    lines = [f"# 1 vs {args.nproc} processes (gloo, 1 thread each): `mpqat train --dataset {args.dataset} "
             f"--method {args.method} --epochs {args.epochs} --batch-size {args.batch_size}`", "",
             f"Machine: {os.cpu_count()} CPUs. Produced by `python benchmarks/distributed/speed.py`.", "",
             "| processes | wall s (incl. start-up, data, test) | train s (epochs) | speed-up (train) | test acc | rank divergence |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nproc']} | {r['wall_seconds']:.1f} | {r['train_seconds']:.1f} | {r['speedup_train']:.2f}x | "
                     f"{r['test_accuracy']:.4f} | {r['rank_divergence']:.3g} |")
    (HERE / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
