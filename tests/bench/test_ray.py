"""The smoke suite through the Ray backend, on a local Ray instance (Ray is a test dependency:
this test must run in CI, so it is not skipped when Ray is missing)."""

from __future__ import annotations

import json
import os

import ray  # noqa: F401  (a missing Ray must fail this test, not skip it)

from mpqat.bench import expand_suite, load_suite, run_suite


def test_smoke_suite_through_a_local_ray_instance(tmp_path):
    out = tmp_path / "smoke-ray"
    result = run_suite("smoke", jobs=2, out=out, backend="ray", progress=False)
    expected = [r.key for r in expand_suite(load_suite("smoke"))]
    records = json.loads((out / "results.json").read_text())["runs"]
    assert [r["key"] for r in records] == expected
    assert result["counts"]["failed"] == 0 and result["counts"]["ok"] >= 2
    for rec in records:
        if rec["status"] != "ok":
            assert rec["status"] == "skipped"
            continue
        metrics = json.loads((out / rec["run_dir"] / "metrics.json").read_text())
        assert metrics["bench"]["pid"] != os.getpid()  # it ran in a Ray worker, not here
        assert metrics["bench"]["torch_threads"] == 1 and metrics["step_seconds"] > 0
    table = (out / "table.md").read_text()
    assert "| fp32 (FP32 reference) |" in table and "| uniform-w4a4 |" in table
    assert (out / "plots" / "breast-cancer-acc-vs-bitops.png").is_file()
    assert "--backend ray" in (out / "README.md").read_text()

    again = run_suite("smoke", jobs=2, out=out, backend="ray", progress=False)
    assert again["counts"]["ran"] == 0 and again["counts"]["cached"] == result["counts"]["ok"]
