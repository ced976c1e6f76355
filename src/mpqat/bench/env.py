"""Where and with what a benchmark ran: machine, versions, date, and the ``README.md`` snippet.

Example:
    >>> info = machine_info()
    >>> info["cpus"] >= 1 and "python" in versions()
    True
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any

#: distributions whose versions are reported (missing ones show as "not installed")
PACKAGES = ("mpqat", "torch", "numpy", "scikit-learn", "brevitas", "hgq2", "keras", "torchao", "ray")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_bytes() -> int | None:
    """Total physical memory in bytes, where it can be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, memory, OS."""
    from mpqat.bench.timing import cpu_count

    return {"cpu": cpu_model(), "cpus": cpu_count(), "logical_cpus": os.cpu_count(),
            "memory_gib": round((memory_bytes() or 0) / 2**30, 1), "os": platform.platform(),
            "hostname": platform.node()}


def versions() -> dict[str, str]:
    """Python and the versions of :data:`PACKAGES` (``"not installed"`` when absent)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def now_iso() -> str:
    """The current date and time, UTC, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def bench_command(suite: str, seeds: int | None, jobs: int, out: str | Path, backend: str,
                  ray_address: str | None, only: list[str] | None) -> str:
    """The ``mpqat bench`` command line that reproduces a run of the harness."""
    argv = ["mpqat", "bench", "--suite", str(suite)]
    if seeds is not None:
        argv += ["--seeds", str(seeds)]
    argv += ["--jobs", str(jobs), "--out", str(out)]
    if backend != "local":
        argv += ["--backend", backend]
    if ray_address:
        argv += ["--ray-address", ray_address]
    for pattern in only or []:
        argv += ["--only", pattern]
    return shlex.join(argv)


def readme_snippet(info: dict[str, Any], table_md: str, plots: list[str]) -> str:
    """The Markdown of ``README.md``: how the numbers were made, then the tables and the plots."""
    m, v, c = info["machine"], info["versions"], info["counts"]
    peers = ", ".join(f"{p} {v[p]}" for p in ("brevitas", "hgq2", "keras", "torchao") if p in v)
    lines = [
        f"# Benchmark: suite `{info['suite']}`",
        "",
        f"{info['description']}\n" if info.get("description") else "",
        "Produced by:",
        "",
        "```sh",
        info["command"],
        "```",
        "",
        f"- Date: {info['date']} (this invocation: {info['wall_seconds']:.0f} s wall, {c['ran']} runs trained, "
        f"{c['cached']} reused from an earlier invocation, {c['failed']} failed, {c['skipped']} skipped"
        + (f", {c['pending']} not run yet" if c.get("pending") else "") + ")",
        f"- Total training time over all runs: {info['total_train_seconds']:.0f} s",
        f"- Machine: {m['cpu']}, {m['cpus']} usable cores ({m['logical_cpus']} logical), "
        f"{m['memory_gib']} GiB RAM, {m['os']}",
        f"- Backend: {info['backend']} with {info['jobs']} job(s); torch threads per run: "
        f"{'1' if info['jobs'] > 1 or info['backend'] == 'ray' else 'torch default'}",
        f"- Versions: Python {v['python']}, torch {v['torch']}, mpqat {v['mpqat']}, numpy {v['numpy']}, "
        f"scikit-learn {v['scikit-learn']}",
        f"- Peers: {peers}" + (f"; Ray {v['ray']}" if info["backend"] == "ray" else ""),
        f"- Seeds: {info['seeds']}; training: {info['train']}",
        "",
        "Files: `results.json` (every run's metrics), `summary.json` (mean ± std per cell), `table.md`, "
        "`plots/`, and one directory per run under `runs/<dataset>/<label>/seed<k>/`.",
        "",
        table_md.split("\n", 1)[1] if table_md.startswith("# ") else table_md,
        "",
        "## Pareto plots",
        "",
    ]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
