"""The benchmark harness: suites of datasets x models x methods x seeds, run locally or on Ray,
aggregated into ``results.json``, ``summary.json``, a Markdown table and Pareto plots.

Command line: ``mpqat bench --suite smoke|tabular|nmp|vision|PATH [--seeds 3] [--jobs N]
[--out benchmarks/NAME] [--backend local|ray] [--ray-address ADDR] [--only GLOB]``.

Example:
    >>> from mpqat.bench import list_suites, load_suite, expand_suite
    >>> "smoke" in list_suites()
    True
    >>> result = run_suite("smoke", jobs=2, out="/tmp/bench-smoke")   # doctest: +SKIP
    >>> open("/tmp/bench-smoke/table.md").read()                      # doctest: +SKIP

Modules: :mod:`~mpqat.bench.suite` (the YAML format and its expansion into runs),
:mod:`~mpqat.bench.runner` (one run; the local, Ray and inline backends),
:mod:`~mpqat.bench.aggregate` (mean ± std per cell), :mod:`~mpqat.bench.table` (Markdown),
:mod:`~mpqat.bench.plots` (Pareto PNGs), :mod:`~mpqat.bench.timing` (step time, peak memory),
:mod:`~mpqat.bench.env` (machine, versions, README snippet), :mod:`~mpqat.bench.peers` (Brevitas,
HGQ2, torchao adapters).
"""

from mpqat.bench.aggregate import mean_std, summarize
from mpqat.bench.harness import cli_bench, run_suite
from mpqat.bench.plots import pareto_figure, pareto_front, write_plots
from mpqat.bench.suite import RunSpec, Suite, SuiteError, expand_suite, list_suites, load_suite
from mpqat.bench.table import markdown_table, suite_markdown
from mpqat.bench.timing import measure_step_seconds, peak_rss_bytes, reset_peak_rss

__all__ = [
    "RunSpec",
    "Suite",
    "SuiteError",
    "cli_bench",
    "expand_suite",
    "list_suites",
    "load_suite",
    "markdown_table",
    "mean_std",
    "measure_step_seconds",
    "pareto_figure",
    "pareto_front",
    "peak_rss_bytes",
    "reset_peak_rss",
    "run_suite",
    "summarize",
    "suite_markdown",
    "write_plots",
]
