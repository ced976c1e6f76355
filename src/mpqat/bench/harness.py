"""``run_suite``: expand a suite, run what is not done yet, aggregate, and write the tables and plots.

Output folder layout::

    OUT/runs/<dataset>/<label>/seed<k>/   one run directory each (metrics.json, or error.json)
    OUT/results.json                      every run: identity, status, metrics / error / skip reason
    OUT/summary.json                      mean ± std per (dataset, label) cell over seeds
    OUT/table.md                          the Markdown tables
    OUT/plots/<dataset>-acc-vs-{bitops,bytes}.png
    OUT/README.md                         command, machine, versions, date, tables and plots
    OUT/suite.yaml                        the suite file as used
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mpqat.bench.aggregate import make_record, summarize
from mpqat.bench.env import bench_command, machine_info, now_iso, readme_snippet, versions
from mpqat.bench.plots import write_plots
from mpqat.bench.runner import BACKENDS, backend_runner, run_complete
from mpqat.bench.suite import SUITES_DIR, RunSpec, check_environment, expand_suite, list_suites, load_suite
from mpqat.bench.table import suite_markdown
from mpqat.errors import ConfigError, MpqatError


def run_suite(
    suite: str | Path,
    seeds: int | None = None,
    jobs: int = 1,
    out: str | Path | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    filter: str | Iterable[str] | None = None,  # noqa: A002  (the name the issue gives it)
    progress: bool = True,
) -> dict[str, Any]:
    """Run every run of ``suite`` that is not complete in ``out`` yet, then aggregate everything.

    ``suite``: a shipped suite name (``smoke``, ``tabular``, ``nmp``, ``vision``) or a YAML path.
    ``seeds``: use seeds ``0..seeds-1`` instead of the suite's. ``jobs``: parallel runs.
    ``out``: output folder (default ``benchmarks/<suite name>``). ``backend``: ``"local"``
    (process pool), ``"ray"`` (local Ray instance, or the cluster at ``ray_address``) or
    ``"inline"`` (this process). ``filter``: glob pattern(s) on ``dataset/label`` (see
    :func:`mpqat.bench.suite.expand_suite`): only those runs are trained, while the outputs still
    cover the whole suite (finished runs from earlier invocations; the others as *pending*).
    A failed run is recorded and the sweep goes on.
    Finished runs are reused, unless their recipe, options, data or training settings changed
    since (``result["stale"]`` lists those trained again). As with any ``multiprocessing`` code, a
    script that calls this with the local backend needs an ``if __name__ == "__main__":`` guard.

    Returns a summary: counts, wall time, output paths and the failures.

    Example:
        >>> result = run_suite("smoke", jobs=2, out="/tmp/bench-smoke")   # doctest: +SKIP
        >>> result["counts"]                                               # doctest: +SKIP
        {'runs': 3, 'ran': 3, 'ok': 3, 'cached': 0, 'failed': 0, 'skipped': 0}
    """
    t0 = time.perf_counter()
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be a positive integer, got {jobs!r}")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
    spec = load_suite(suite)
    out = Path(out) if out is not None else Path("benchmarks") / spec.name
    runs = expand_suite(spec, seeds=list(range(seeds)) if seeds else None)
    selected = {r.key for r in expand_suite(spec, seeds=list(range(seeds)) if seeds else None, filter=filter)} \
        if filter else {r.key for r in runs}
    if not selected:
        raise ConfigError(f"no run of suite '{spec.name}' matches {filter!r}: runs are named "
                          "DATASET/LABEL/seedK; patterns are globs such as 'adult/*' or 'nmp*'")
    check_environment([r for r in runs if r.key in selected])
    runner = backend_runner(backend, ray_address)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    if spec.path is not None and spec.path.resolve() != (root / "suite.yaml"):
        shutil.copyfile(spec.path, out / "suite.yaml")

    records: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    stale: list[str] = []
    for run in runs:
        task = {**run.to_dict(), "root": str(root)}
        if run.status == "skipped":
            records[run.key] = make_record(task, "skipped", reason=run.reason)
        elif run.status == "invalid":
            records[run.key] = make_record(task, "failed", error=run.reason)
        elif (metrics := run_complete(root / run.run_dir, task)) is not None:
            records[run.key] = make_record(task, "cached", metrics=metrics)
        elif run.key not in selected:  # left out by the filter and not done yet
            records[run.key] = make_record(task, "pending", reason="not run yet (left out by --only)")
        else:
            if run_complete(root / run.run_dir) is not None:  # finished under other settings
                task["restart"] = True
                stale.append(run.key)
            todo.append(task)
    by_key = {task["key"]: task for task in todo}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"bench {spec.name}", unit="run", disable=not progress or not todo)
    for outcome in runner(todo, jobs):
        task = by_key[outcome["key"]]
        run_dir = root / task["run_dir"]
        if outcome["status"] == "ok":
            metrics = outcome["metrics"]
            if run_complete(run_dir, task) is None:  # a Ray worker on another machine wrote it there
                _write(run_dir / "metrics.json", metrics)
            records[task["key"]] = make_record(task, "ok", metrics=metrics, seconds=outcome.get("seconds"))
        else:
            if not (run_dir / "error.json").is_file():
                _write(run_dir / "error.json", {"message": outcome.get("error"), "task": task})
            records[task["key"]] = make_record(task, "failed", error=outcome.get("error"), seconds=outcome.get("seconds"))
        bar.set_postfix_str(f"{task['key']}: {outcome['status']}", refresh=False)
        bar.update(1)
    bar.close()

    ordered = [records[run.key] for run in runs]
    result = _write_outputs(spec, runs, ordered, out, root, seeds=seeds, jobs=jobs, backend=backend,
                            ray_address=ray_address, filter=filter, ran=len(todo), t0=t0)
    result["stale"] = stale
    return result


def _write(path: Path, data: Any) -> None:
    from mpqat.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _write_outputs(spec, runs: list[RunSpec], records: list[dict[str, Any]], out: Path, root: Path, *,
                   seeds, jobs, backend, ray_address, filter, ran: int, t0: float) -> dict[str, Any]:  # noqa: A002
    summary = {"suite": spec.name, **summarize(records)}
    _write(out / "results.json", {"suite": spec.name, "runs": records})
    _write(out / "summary.json", summary)
    table = suite_markdown(summary, title=f"Suite `{spec.name}`")
    (out / "table.md").write_text(table)
    plots = write_plots(summary, out / "plots")
    statuses = [r["status"] for r in records]
    counts = {"runs": len(records), "ran": ran, "ok": statuses.count("ok"), "cached": statuses.count("cached"),
              "failed": statuses.count("failed"), "skipped": statuses.count("skipped"),
              "pending": statuses.count("pending")}
    patterns = [filter] if isinstance(filter, str) else list(filter or [])
    info = {
        "suite": spec.name, "description": spec.description,
        "command": bench_command(spec.name if spec.path is None or spec.path.parent == SUITES_DIR else str(spec.path),
                                 seeds, jobs, out, backend, ray_address, patterns),
        "date": now_iso(), "machine": machine_info(), "versions": versions(), "backend": backend, "jobs": jobs,
        "seeds": sorted({r.seed for r in runs}), "train": spec.train, "counts": counts,
        "wall_seconds": time.perf_counter() - t0,
        "total_train_seconds": sum((r.get("metrics") or {}).get("train_seconds") or 0.0 for r in records),
    }
    rel_plots = [str(p.relative_to(out)) for p in plots]
    (out / "README.md").write_text(readme_snippet(info, table, rel_plots))
    _write(out / "environment.json", info)
    failures = [{"run": r["key"], "error": r.get("error")} for r in records if r["status"] == "failed"]
    return {
        "suite": spec.name, "out": str(out), "counts": counts, "seconds": info["wall_seconds"],
        "results": str(out / "results.json"), "summary": str(out / "summary.json"), "table": str(out / "table.md"),
        "readme": str(out / "README.md"), "plots": [str(p) for p in plots], "failures": failures,
        "skipped": sorted({f"{r['dataset_key']}/{r['label']}: {r.get('reason')}" for r in records if r["status"] == "skipped"}),
    }


def cli_bench(
    suite: str,
    seeds: int | None = None,
    jobs: int = 1,
    out: str | Path | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    only: Iterable[str] | None = None,
) -> dict[str, Any]:
    """What ``mpqat bench`` does: :func:`run_suite` with progress, then a few lines on stdout.

    Raises :class:`~mpqat.errors.MpqatError` (one-line CLI error) for an unknown suite, listing
    the shipped ones.

    Example:
        >>> cli_bench("smoke", jobs=2, out="runs/bench-smoke")   # doctest: +SKIP
        smoke: 3 runs (3 trained, 0 reused, 0 failed, 0 skipped) in 21 s
        ...
    """
    import click

    if not str(suite).strip():
        raise MpqatError(f"--suite is required: choose one of {', '.join(list_suites())}, or a YAML path")
    patterns = [p for p in (only or []) if p]
    result = run_suite(suite, seeds=seeds, jobs=jobs, out=out, backend=backend, ray_address=ray_address,
                       filter=patterns or None, progress=True)
    c = result["counts"]
    click.echo(f"{result['suite']}: {c['runs']} runs ({c['ran']} trained now, {c['cached']} reused, "
               f"{c['failed']} failed, {c['skipped']} skipped"
               + (f", {c['pending']} left out by --only" if c["pending"] else "") + f") in {result['seconds']:.0f} s")
    if result["stale"]:
        click.echo(f"  trained again because their settings changed: {', '.join(result['stale'])}")
    for item in result["skipped"]:
        click.echo(f"  skipped {item}")
    for item in result["failures"]:
        click.echo(f"  failed  {item['run']}: {item['error']}")
    click.echo(f"wrote {result['table']}, {result['results']}, {result['summary']}, {result['readme']} "
               f"and {len(result['plots'])} plots in {Path(result['out']) / 'plots'}")
    return result
