"""Issue 4's deployment figures, from the tabular benchmark's trained runs.

For each dataset: export the NMP-QAT (``nmp-r0.03``) and uniform W4A4 runs of seed 0, check the
integer engine against the PyTorch model on every test row, and report the ``.mpq`` size next to
the bit budget, the FP32 ``state_dict`` and Brevitas' QCDQ ONNX export of a W4A4 model of the same
shape; then the engine's latency at batch 1 and 1024 against FP32 PyTorch on the same MLP.

    python benchmarks/export_report.py            # after: mpqat bench --suite tabular --seeds 3
writes benchmarks/export/results.json and benchmarks/export/table.md.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from mpqat.export.bench import latency_report
from mpqat.export.commands import export_run
from mpqat.export.ir import IntegerGraph

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "tabular" / "runs"
OUT = ROOT / "export"
DATASETS = ("telco-churn", "mlc-churn", "adult", "letter", "pendigits")
LABELS = ("nmp-r0.03", "uniform-w4a4")


def brevitas_onnx_bytes(n_features: int, n_classes: int, hidden: list[int], splits) -> int | None:
    """Size of Brevitas' QCDQ ONNX export of a W4A4 MLP of the same shape (2 epochs: size does not depend on training)."""
    try:
        from mpqat.bench.peers import available_peers, brevitas_onnx_size, run_peer
    except ImportError:
        return None
    if available_peers().get("brevitas") is not None:
        return None
    result = run_peer("brevitas", splits.X_train, splits.y_train, splits.X_valid, splits.y_valid, splits.X_test,
                      splits.y_test, hidden=tuple(hidden), epochs=2, w_bits=4, a_bits=4)
    with tempfile.TemporaryDirectory() as tmp:
        return brevitas_onnx_size(result, Path(tmp) / "brevitas.onnx")


def main() -> int:
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    rows = []
    for dataset in DATASETS:
        for label in LABELS:
            run_dir = RUNS / dataset / label / "seed0"
            if not (run_dir / "metrics.json").exists():
                print(f"missing {run_dir}; run the tabular benchmark first", file=sys.stderr)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                report = export_run(run_dir, Path(tmp) / "model.mpq")
                graph = IntegerGraph.load(Path(tmp) / "model.mpq")
            from mpqat.runs import load_run

            run = load_run(run_dir)
            splits = run.splits()
            latency = latency_report(run.model, graph, splits.X_test, repeats=100)
            row = {
                "dataset": dataset, "method": label,
                "test_rows": report["test_rows"], "bit_identical_rows": report["bit_identical_rows"],
                "mpq_bytes": report["file_bytes"], "budget_bytes": report["budget_bytes"],
                "ratio_to_budget": report["ratio_to_budget"], "fp32_state_dict_bytes": report["fp32_state_dict_bytes"],
                "brevitas_w4a4_onnx_bytes": None,
                "batch1_engine_ms": latency["batch_1"]["engine_auto_ms"],
                "batch1_torch_fp32_ms": latency["batch_1"]["torch_fp32_ms"],
                "batch1024_engine_ms": latency["batch_1024"]["engine_auto_ms"],
                "batch1024_torch_fp32_ms": latency["batch_1024"]["torch_fp32_ms"],
            }
            if label == "uniform-w4a4":
                row["brevitas_w4a4_onnx_bytes"] = brevitas_onnx_bytes(
                    splits.n_features, splits.n_classes, run.info["model_spec"]["hidden"], splits)
            rows.append(row)
            print(f"{dataset} {label}: {row['bit_identical_rows']}/{row['test_rows']} identical, "
                  f".mpq {row['mpq_bytes']} B = {row['ratio_to_budget']:.3f} x budget")
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# Deployment: bit-exact integer graph, file size and latency", "",
        f"`python benchmarks/export_report.py` on {date.today()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread. Models: seed-0 runs of `benchmarks/tabular` (MLP 128x128).", "",
        "| dataset | method | identical test rows | .mpq bytes | bit budget bytes | .mpq / budget | FP32 state_dict | "
        "Brevitas W4A4 ONNX | batch 1: engine / FP32 torch (ms) | batch 1024: engine / FP32 torch (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        brev = f"{r['brevitas_w4a4_onnx_bytes']:,}" if r["brevitas_w4a4_onnx_bytes"] else "—"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['bit_identical_rows']}/{r['test_rows']} | {r['mpq_bytes']:,} | "
            f"{r['budget_bytes']:,.0f} | {r['ratio_to_budget']:.3f} | {r['fp32_state_dict_bytes']:,} | {brev} | "
            f"{r['batch1_engine_ms']:.3f} / {r['batch1_torch_fp32_ms']:.3f} "
            f"({r['batch1_engine_ms'] / r['batch1_torch_fp32_ms']:.2f}x) | "
            f"{r['batch1024_engine_ms']:.2f} / {r['batch1024_torch_fp32_ms']:.2f} "
            f"({r['batch1024_engine_ms'] / r['batch1024_torch_fp32_ms']:.2f}x) |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
