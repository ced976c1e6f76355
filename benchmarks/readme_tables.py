"""Print the README's compact results tables from the harness' ``benchmarks/tabular/summary.json``.

    python benchmarks/readme_tables.py > /tmp/results.md
Every figure is read from the harness output; nothing is typed in by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY = Path(__file__).resolve().parent / "tabular" / "summary.json"
DATASETS = ("telco-churn", "mlc-churn", "adult", "letter", "pendigits")
ACCURACY_ROWS = ("fp32", "uniform-w8a8", "uniform-w4a4", "uniform-w2a4", "uniform-w2a2", "uniform-w1a4", "layer-bits",
                 "nmp-paper", "nmp-r0.03", "hawq-w3", "brevitas-w4a4", "brevitas-learned", "hgq2")


def main() -> None:
    cells = {(c["dataset"], c["label"]): c["stats"] for c in json.loads(SUMMARY.read_text())["cells"] if c.get("stats")}

    def acc(d: str, label: str) -> str:
        s = cells.get((d, label))
        if not s or "test_accuracy" not in s:
            return "—"
        return f"{100 * s['test_accuracy']['mean']:.2f} ± {100 * s['test_accuracy']['std']:.2f}"

    def bits(d: str, label: str) -> str:
        s = cells.get((d, label))
        if not s or "avg_weight_bits" not in s:
            return "—"
        return (f"{s['avg_weight_bits']['mean']:.2f} / {s['avg_act_bits']['mean']:.2f} · "
                f"{100 * s['bitops']['mean'] / s['fp32_bitops']['mean']:.2f}% · {s['size_bytes']['mean']:,.0f} B")

    print("Test accuracy (%), mean ± std over 3 seeds:\n")
    print("| method | " + " | ".join(DATASETS) + " |")
    print("|---|" + "---|" * len(DATASETS))
    for label in ACCURACY_ROWS:
        print(f"| {label} | " + " | ".join(acc(d, label) for d in DATASETS) + " |")
    print("\nAverage weight bits / average activation bits · BitOps relative to FP32 · size in bytes:\n")
    print("| method | " + " | ".join(DATASETS) + " |")
    print("|---|" + "---|" * len(DATASETS))
    for label in ACCURACY_ROWS:
        print(f"| {label} | " + " | ".join(bits(d, label) for d in DATASETS) + " |")


if __name__ == "__main__":
    main()
