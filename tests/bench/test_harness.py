"""The benchmark harness: the smoke suite end to end (local process pool), resumability, and the
suite format, aggregation, table and Pareto code on hand-made metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpqat.bench import (
    cli_bench,
    expand_suite,
    list_suites,
    load_suite,
    markdown_table,
    mean_std,
    measure_step_seconds,
    pareto_figure,
    pareto_front,
    run_suite,
    summarize,
    suite_markdown,
    write_plots,
)
from mpqat.bench.aggregate import best_per_group
from mpqat.bench.suite import SuiteError, suite_from_dict
from mpqat.errors import MpqatError


# ------------------------------------------------------------------------------ smoke, end to end
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    result = run_suite("smoke", jobs=2, out=out, backend="local", progress=False)
    return out, result


def test_smoke_suite_writes_every_output(smoke):
    out, result = smoke
    expected = [r.key for r in expand_suite(load_suite("smoke"))]
    records = json.loads((out / "results.json").read_text())["runs"]
    assert [r["key"] for r in records] == expected  # every run present, in suite order
    assert result["counts"]["runs"] == len(expected) and result["counts"]["failed"] == 0
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["label"] for r in ok} >= {"fp32", "uniform-w4a4"}
    for rec in ok:
        metrics = json.loads((out / rec["run_dir"] / "metrics.json").read_text())
        assert metrics["test_accuracy"] == rec["metrics"]["test_accuracy"]
        assert metrics["step_seconds"] > 0 and metrics["fp32_step_seconds"] > 0
        assert metrics["peak_rss_bytes"] > 0 and metrics["bench"]["label"] == rec["label"]
    for rec in records:
        if rec["status"] == "skipped":  # nmp until it is registered
            assert "not registered" in rec["reason"]
    for name in ("summary.json", "table.md", "README.md", "environment.json", "suite.yaml"):
        assert (out / name).is_file(), name
    for cost in ("bitops", "bytes"):
        png = out / "plots" / f"breast-cancer-acc-vs-{cost}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_smoke_summary_and_table_agree_with_the_runs(smoke):
    out, _ = smoke
    records = {r["label"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    cells = {c["label"]: c for c in json.loads((out / "summary.json").read_text())["cells"]}
    assert set(cells) == set(records)
    for label, rec in records.items():
        if rec["status"] == "ok":  # one seed: the mean is the run's value, the std 0
            stat = cells[label]["stats"]["test_accuracy"]
            assert stat == {"mean": rec["metrics"]["test_accuracy"], "std": 0.0, "n": 1}
    fp32, w4 = records["fp32"]["metrics"], records["uniform-w4a4"]["metrics"]
    assert cells["uniform-w4a4"]["delta_vs_fp32"]["mean"] == pytest.approx(w4["test_accuracy"] - fp32["test_accuracy"])
    assert cells["uniform-w4a4"]["stats"]["bitops_ratio"]["mean"] == pytest.approx(w4["bitops"] / w4["fp32_bitops"])
    table = (out / "table.md").read_text()
    assert "| fp32 (FP32 reference) |" in table and "| uniform-w4a4 |" in table
    assert f"{fp32['test_accuracy'] * 100:.2f}" in table
    assert f"**{w4['test_accuracy'] * 100:.2f}**" in table  # the only member of its group is the best
    readme = (out / "README.md").read_text()
    assert "mpqat bench --suite smoke --jobs 2" in readme and "torch" in readme and "plots/" in readme


def test_smoke_rerun_skips_every_finished_run(smoke):
    out, first = smoke
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.json")}
    again = run_suite("smoke", jobs=2, out=out, progress=False)
    assert again["counts"]["ran"] == 0
    assert again["counts"]["cached"] == first["counts"]["ok"] + first["counts"]["cached"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.json")} == mtimes


# ------------------------------------------------------------------------------ failures and peers
def _tiny_suite(path: Path, methods: list[dict], **train) -> Path:
    data = {"name": "tiny", "seeds": 1, "timing": {"repeats": 2, "warmup": 1},
            "train": {"epochs": 1, "batch_size": 32, "max_rows": 150, **train},
            "models": [{"name": "mlp", "hidden": [8]}], "datasets": ["breast-cancer"], "methods": methods}
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    suite = _tiny_suite(tmp_path / "tiny.yaml", [
        {"label": "bad", "recipe": {"method": "fp32"}, "train": {"max_rows": 4}},  # too few rows: fails
        {"label": "invalid", "recipe": {"method": "uniform", "w_bits": 99}},       # fails validation
        {"label": "good", "recipe": {"method": "fp32"}},
    ])
    result = run_suite(suite, jobs=1, out=tmp_path / "out", backend="inline", progress=False)
    statuses = {r["label"]: r["status"] for r in json.loads((tmp_path / "out/results.json").read_text())["runs"]}
    assert statuses == {"bad": "failed", "invalid": "failed", "good": "ok"}
    assert {f["run"].split("/")[1] for f in result["failures"]} == {"bad", "invalid"}
    error = json.loads((tmp_path / "out/runs/breast-cancer/bad/seed0/error.json").read_text())
    assert error["type"] == "DatasetError" and "max_rows" in error["message"]
    table = (tmp_path / "out/table.md").read_text()
    assert "| bad |" in table and "failed: DatasetError" in table and "w_bits=99" in table


def test_changed_settings_retrain_only_the_runs_they_define(tmp_path):
    methods = [{"label": "fp32", "recipe": {"method": "fp32"}},
               {"label": "w4", "recipe": {"method": "uniform", "w_bits": 4, "a_bits": 4}, "group": "W4"}]
    suite = _tiny_suite(tmp_path / "tiny.yaml", methods)
    first = run_suite(suite, out=tmp_path / "out", backend="inline", progress=False)
    assert first["counts"]["ran"] == 2
    methods[1]["recipe"]["w_bits"] = 2
    methods[0]["group"] = "reference"  # presentation only: no retraining
    again = run_suite(_tiny_suite(tmp_path / "tiny.yaml", methods), out=tmp_path / "out", backend="inline",
                      progress=False)
    assert again["counts"]["ran"] == 1 and again["stale"] == ["breast-cancer/w4/seed0"]
    runs = {r["label"]: r for r in json.loads((tmp_path / "out/results.json").read_text())["runs"]}
    assert runs["w4"]["metrics"]["avg_weight_bits"] == 2.0 and runs["fp32"]["group"] == "reference"


def test_a_filter_trains_a_subset_and_the_outputs_still_cover_the_suite(tmp_path):
    suite = _tiny_suite(tmp_path / "tiny.yaml", [{"label": "fp32", "recipe": {"method": "fp32"}},
                                                 {"label": "w4", "recipe": {"method": "uniform", "w_bits": 4}}])
    first = run_suite(suite, out=tmp_path / "out", backend="inline", filter="fp*", progress=False)
    assert first["counts"] == {"runs": 2, "ran": 1, "ok": 1, "cached": 0, "failed": 0, "skipped": 0, "pending": 1}
    assert "| w4 |  | 0/1 | not run yet |" in (tmp_path / "out/table.md").read_text()
    second = run_suite(suite, out=tmp_path / "out", backend="inline", progress=False)
    assert (second["counts"]["ran"], second["counts"]["cached"], second["counts"]["pending"]) == (1, 1, 0)


def test_peers_run_through_the_same_interface_and_missing_ones_are_skipped(tmp_path, monkeypatch):
    import mpqat.bench.peers as peers

    calls = []

    def fake_run_peer(name, X_train, y_train, X_valid, y_valid, X_test, y_test, **kwargs):
        calls.append((name, len(X_train), kwargs))
        return peers.PeerResult(peer=name, test_accuracy=0.75, avg_weight_bits=3.0, avg_act_bits=6.0, bitops=1e4,
                                size_bytes=500.0, train_seconds=0.5, step_seconds=0.002, epochs=1)

    monkeypatch.setattr(peers, "run_peer", fake_run_peer)
    monkeypatch.setattr(peers, "available_peers", lambda: {"brevitas": None, "hgq2": "hgq2 is not installed"})
    suite = _tiny_suite(tmp_path / "tiny.yaml", [
        {"label": "fp32", "recipe": {"method": "fp32"}},
        {"label": "brevitas-w{w_bits}", "peer": "brevitas", "options": {"a_bits": 4}, "budgets": [{"w_bits": 4}],
         "group": "W4"},
        {"label": "hgq2", "peer": "hgq2"},
    ])
    run_suite(suite, jobs=1, out=tmp_path / "out", backend="inline", progress=False)
    runs = {r["label"]: r for r in json.loads((tmp_path / "out/results.json").read_text())["runs"]}
    assert runs["hgq2"]["status"] == "skipped" and "not installed" in runs["hgq2"]["reason"]
    assert runs["brevitas-w4"]["status"] == "ok"
    name, n_train, kwargs = calls[0]
    assert name == "brevitas" and kwargs["hidden"] == (8,) and kwargs["w_bits"] == 4 and kwargs["a_bits"] == 4
    assert kwargs["epochs"] == 1 and kwargs["batch_size"] == 32 and kwargs["patience"] == 10
    m = runs["brevitas-w4"]["metrics"]
    assert m["fp32_bitops"] == runs["fp32"]["metrics"]["fp32_bitops"]  # costed against the same FP32 MLP
    assert m["step_ratio_vs_fp32"] == pytest.approx(0.002 / m["fp32_step_seconds"])
    table = (tmp_path / "out/table.md").read_text()
    assert "| hgq2 |" in table and "skipped: hgq2 not available: hgq2 is not installed" in table


def test_missing_ray_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MpqatError, match=r"pip install -e '\.\[ray\]'"):
        run_suite("smoke", jobs=1, out=tmp_path, backend="ray", progress=False)


def test_unknown_suite_lists_the_shipped_ones(tmp_path):
    with pytest.raises(MpqatError, match="choose one of .*smoke.*tabular"):
        cli_bench("no-such-suite", out=tmp_path)
    assert {"smoke", "tabular", "vision", "nmp"} <= set(list_suites())


# ------------------------------------------------------------------------------ suite format
def _suite(methods, **extra):
    return suite_from_dict({"datasets": ["breast-cancer", "adult"], "methods": methods, **extra})


def test_budgets_expand_into_labelled_runs_with_groups():
    suite = _suite([
        {"label": "u-w{w_bits}a{a_bits}", "recipe": {"method": "uniform"}, "group": "W{w_bits}",
         "budgets": [{"w_bits": 8, "a_bits": 8}, {"w_bits": 2, "a_bits": 4}]},
        {"label": "fp32", "recipe": {"method": "fp32"}, "datasets": ["adult"]},
    ], seeds=2)
    runs = expand_suite(suite)
    assert [r.key for r in runs] == [
        "breast-cancer/u-w8a8/seed0", "breast-cancer/u-w8a8/seed1", "breast-cancer/u-w2a4/seed0",
        "breast-cancer/u-w2a4/seed1", "adult/u-w8a8/seed0", "adult/u-w8a8/seed1", "adult/u-w2a4/seed0",
        "adult/u-w2a4/seed1", "adult/fp32/seed0", "adult/fp32/seed1"]
    assert runs[2].recipe["w_bits"] == 2 and runs[2].recipe["a_bits"] == 4 and runs[2].group == "W2"
    assert runs[2].run_dir == "runs/breast-cancer/u-w2a4/seed0"
    assert [r.key for r in expand_suite(suite, seeds=[5], filter="adult/u-*")] == ["adult/u-w8a8/seed5", "adult/u-w2a4/seed5"]


def test_scalar_budgets_and_unregistered_methods():
    suite = _suite([{"label": "nmp-r{budget:g}", "recipe": {"method": "no-such-method"}, "budget_field": "reg_coef",
                     "budgets": [0.1, 1.0]}])
    runs = expand_suite(suite)
    assert [r.label for r in runs[:2]] == ["nmp-r0.1", "nmp-r1"] and runs[1].recipe["reg_coef"] == 1.0
    assert all(r.status == "skipped" and "not registered" in r.reason for r in runs)


@pytest.mark.parametrize("methods, message", [
    ([{"label": "x", "recipe": {"method": "fp32"}, "colour": 1}], "unknown key"),
    ([{"label": "x", "recipe": {"method": "fp32"}, "peer": "brevitas"}], "exactly one of"),
    ([{"label": "x", "recipe": {"method": "fp32"}}, {"label": "x", "recipe": {"method": "uniform"}}], "used twice"),
    ([{"label": "u", "recipe": {"method": "uniform"}, "budgets": [4, 8]}], "budget_field"),
    ([{"label": "a b", "recipe": {"method": "fp32"}}], "cannot name a run directory"),
    ([{"label": "u-{w_bits}", "recipe": {"method": "uniform"}}], "does not define"),
])
def test_malformed_suites_are_refused(methods, message):
    with pytest.raises(SuiteError, match=message):
        expand_suite(_suite(methods))


# ------------------------------------------------------------------------------ aggregation, table, plots
def _rec(label, seed, acc, method="uniform", group=None, bitops=1e4, size=1e3, status="ok", **extra):
    metrics = {"test_accuracy": acc, "bitops": bitops, "fp32_bitops": 1e6, "size_bytes": size,
               "fp32_size_bytes": 4e3, "avg_weight_bits": 4.0, "avg_act_bits": 4.0, "train_seconds": 1.0,
               "step_seconds": 0.002, "step_ratio_vs_fp32": 1.25}
    rec = {"dataset": "d", "label": label, "method": method, "kind": "recipe", "model_label": "mlp", "seed": seed,
           "group": group, "status": status, **extra}
    if status == "ok":
        rec["metrics"] = metrics
    return rec


HAND_MADE = [
    _rec("fp32", 0, 0.90, method="fp32", bitops=1e6, size=4e3), _rec("fp32", 1, 0.92, method="fp32", bitops=1e6, size=4e3),
    _rec("w8", 0, 0.89, group="W8", bitops=6e4), _rec("w8", 1, 0.93, group="W8", bitops=6e4),
    _rec("w2", 0, 0.80, group="W2", bitops=8e3, size=500), _rec("w2", 1, 0.0, status="failed", error="boom"),
    _rec("w2-alt", 0, 0.85, group="W2", bitops=9e3, size=600), _rec("w2-alt", 1, 0.87, group="W2", bitops=9e3, size=600),
    _rec("nmp", 0, 0.0, method="nmp", status="skipped", reason="not registered"),
]


def test_summary_mean_std_and_paired_delta():
    cells = {c["label"]: c for c in summarize(HAND_MADE)["cells"]}
    w8 = cells["w8"]
    assert w8["stats"]["test_accuracy"]["mean"] == pytest.approx(0.91)
    assert w8["stats"]["test_accuracy"]["std"] == pytest.approx(np.std([0.89, 0.93], ddof=1))
    assert w8["delta_vs_fp32"]["mean"] == pytest.approx(((0.89 - 0.90) + (0.93 - 0.92)) / 2)
    assert w8["stats"]["bitops_ratio"]["mean"] == pytest.approx(0.06)
    assert cells["w2"]["status"] == "partial" and cells["w2"]["n_ok"] == 1 and cells["w2"]["n_seeds"] == 2
    assert cells["w2"]["delta_vs_fp32"]["n"] == 1 and cells["nmp"]["status"] == "skipped"
    assert mean_std([1.0, float("nan"), 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "n": 2}


def test_best_accuracy_per_budget_group_is_bold():
    summary = summarize(HAND_MADE)
    assert best_per_group(summary["cells"]) == {("d", "w8"), ("d", "w2-alt")}
    table = markdown_table(summary["cells"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "**91.00 ± 2.83**" in rows["w8"] and "**86.00 ± 1.41**" in rows["w2-alt"]
    assert "**" not in rows["w2"] and "**" not in rows["fp32 (FP32 reference)"]
    assert "| ref. |" in rows["fp32 (FP32 reference)"] and "+0.00 ± 1.41" in rows["w8"]
    assert "| 1/2 |" in rows["w2"] and "skipped: not registered" in rows["nmp"]
    assert "6%" in rows["w8"] and "1.25×" in rows["w8"]
    doc = suite_markdown(summary, title="t")
    assert "failed: `d/w2/seed1`: boom" in doc and "skipped: `d/nmp`" in doc


def test_pareto_front_and_plot():
    assert pareto_front([1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.6, 0.8]) == [0, 1, 3]
    assert pareto_front([2.0, 2.0, 1.0], [0.9, 0.8, 0.9]) == [2]
    cells = summarize(HAND_MADE)["cells"]
    fig = pareto_figure(cells, "bitops")
    ax = fig.axes[0]
    fp32 = [line for line in ax.get_lines() if line.get_gid() == "fp32-reference"]
    assert len(fp32) == 1 and fp32[0].get_ydata()[0] == pytest.approx(91.0)
    front = [line for line in ax.get_lines() if line.get_gid() == "pareto-front"][0]
    assert list(front.get_xdata()) == [8e3, 9e3, 6e4]  # w2, w2-alt, w8; fp32 is the line, not a point
    assert ax.get_xscale() == "log"


def test_write_plots_one_png_per_dataset_and_cost(tmp_path):
    paths = write_plots(summarize(HAND_MADE), tmp_path)
    assert sorted(p.name for p in paths) == ["d-acc-vs-bitops.png", "d-acc-vs-bytes.png"]


def test_measure_step_seconds_leaves_the_model_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = np.random.default_rng(0).normal(size=(20, 6)).astype("float32")
    y = (X[:, 0] > 0).astype("int64")
    seconds = measure_step_seconds(model, X, y, batch_size=64, repeats=3, warmup=1, threads=1)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
