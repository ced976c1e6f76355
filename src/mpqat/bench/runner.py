"""Running a suite's runs: one function per run, and the backends that call it.

:func:`execute_run` trains one run into its directory and returns an outcome dict; it never
raises (a failure is written to ``error.json`` and returned). The backends only decide where it
runs:

* ``local``: :class:`concurrent.futures.ProcessPoolExecutor` with ``jobs`` worker processes
  (``spawn`` start method; each worker sets ``torch.set_num_threads(1)`` when ``jobs > 1``);
* ``ray``: one Ray task per run (``num_cpus=1``) on a local Ray instance started with
  ``num_cpus=jobs``, or on the cluster at ``ray_address``; Ray is an optional extra
  (``pip install -e .[ray]``);
* ``inline``: in this process, one run after the other (for debugging and tests).

A run is complete when its ``metrics.json`` holds the harness's ``bench`` block (written last);
complete runs are never dispatched again, so an interrupted sweep resumes where it stopped (a
half-trained run continues from its checkpoint). A complete run whose settings (recipe, peer
options, training settings, data, model, seed) differ from the suite's now is *stale* and is
trained again from scratch; labels, groups and notes may change freely. Runs with float pretraining
(``pretrain_epochs``) share it through ``OUT/pretrain-cache/``: the first run of a (dataset, model,
seed) trains the float model, the others quantize a copy of it.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mpqat.errors import ConfigError, MpqatError

BACKENDS = ("local", "ray", "inline")
#: under the suite's output directory: float pretrainings shared by runs that differ only in their
#: recipe (same data, seed, model, pretraining settings; see mpqat.runs.pretrain_float)
PRETRAIN_CACHE = "pretrain-cache"

Outcome = dict[str, Any]


# ------------------------------------------------------------------------------------- one run
#: what defines a run's result; a finished run whose settings differ in any of these is stale
IDENTITY_KEYS = ("dataset", "target", "model", "hidden", "dropout", "kind", "method", "recipe", "peer", "options",
                 "seed", "train")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_complete(run_dir: Path, task: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The metrics of a complete run in ``run_dir``, or None when it has to be (re)done.

    With ``task``, a run trained under other settings (recipe, peer options, training settings,
    data, model, seed) is not complete: it is *stale* (see :func:`is_stale`).
    """
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(metrics, dict) or "bench" not in metrics:
        return None
    if task is not None and is_stale(metrics, task):
        return None
    return metrics


def is_stale(metrics: dict[str, Any], task: dict[str, Any]) -> bool:
    """True when ``metrics`` (with its ``bench`` block) were produced by other settings than ``task``."""
    done = metrics.get("bench") or {}
    return any(_plain(done.get(k)) != _plain(task.get(k)) for k in IDENTITY_KEYS)


def _write_json(path: Path, data: Any) -> None:
    from mpqat.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def execute_run(task: dict[str, Any]) -> Outcome:
    """Train one run described by ``task`` (a :meth:`RunSpec.to_dict` plus ``root``); never raises.

    Returns ``{"key", "status": "ok"|"failed", "seconds", "metrics" or "error"}``. The run's
    directory gets ``metrics.json`` (with a ``bench`` block) or ``error.json``.
    """
    from mpqat.bench.timing import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    t0 = time.perf_counter()
    run_dir = Path(task["root"]) / task["run_dir"]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.json").unlink(missing_ok=True)
        reset_peak_rss()
        rss_start = current_rss_bytes()
        if task["kind"] == "peer":
            metrics = _train_peer(task, run_dir)
        else:
            metrics = _train_recipe(task, run_dir)
        peak, source = peak_rss_bytes()
        metrics["peak_rss_bytes"] = peak
        if rss_start is not None and source == "VmHWM":
            metrics["peak_rss_delta_bytes"] = peak - rss_start  # above the process's size at the run's start
        metrics["run_seconds"] = time.perf_counter() - t0
        metrics["bench"] = _bench_block(task, peak_source=source)
        _write_json(run_dir / "metrics.json", metrics)
        return {"key": task["key"], "status": "ok", "seconds": metrics["run_seconds"], "metrics": metrics}
    except BaseException as exc:  # noqa: BLE001  (a failed run must not stop the sweep)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        error = {"type": type(exc).__name__, "message": str(exc) or repr(exc),
                 "user_error": isinstance(exc, MpqatError), "traceback": traceback.format_exc(),
                 "seconds": time.perf_counter() - t0, "task": task}
        try:
            _write_json(run_dir / "error.json", error)
        except OSError:
            pass
        return {"key": task["key"], "status": "failed", "seconds": error["seconds"],
                "error": f"{error['type']}: {error['message']}"}


def _bench_block(task: dict[str, Any], peak_source: str) -> dict[str, Any]:
    from mpqat.bench.timing import cpu_count, torch_threads

    keys = ("suite", "dataset_key", "label", "method_label", "model_label", "group", "budget", "timing", "note",
            *IDENTITY_KEYS)
    return {**{k: task.get(k) for k in keys}, "peak_rss_source": peak_source,
            "torch_threads": torch_threads(), "cpus": cpu_count(), "pid": os.getpid(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _train_config(task: dict[str, Any]):
    from mpqat.train import TrainConfig

    t = task["train"]
    return TrainConfig(epochs=int(t["epochs"]), batch_size=int(t["batch_size"]), lr=float(t["lr"]),
                       optimizer=str(t.get("optimizer", "adam")), weight_decay=float(t.get("weight_decay", 0.0)),
                       patience=int(t["patience"]), seed=int(task["seed"]), progress=False,
                       pretrain_epochs=int(t.get("pretrain_epochs", 0)),
                       pretrain_lr=float(t["pretrain_lr"]) if t.get("pretrain_lr") is not None else None,
                       lr_schedule=str(t.get("lr_schedule", "constant")))


def _timing_kwargs(task: dict[str, Any]) -> dict[str, Any] | None:
    timing = task.get("timing")
    if not timing:
        return None
    return {"batch_size": int(timing.get("batch_size") or task["train"]["batch_size"]),
            "repeats": int(timing["repeats"]), "warmup": int(timing["warmup"]),
            "lr": float(task["train"]["lr"]), "seed": int(task["seed"]),
            "threads": int(timing["threads"]) if timing.get("threads") else None}


def _train_recipe(task: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from mpqat.bench.suite import method_registered
    from mpqat.recipes import recipe_from_dict
    from mpqat.runs import load_run, train_run

    if not method_registered(task["method"]):
        raise ConfigError(f"method '{task['method']}' is not registered in this worker's mpqat")
    recipe = recipe_from_dict(task["recipe"])
    kwargs = {"model": task["model"], "hidden": task["hidden"], "config": _train_config(task),
              "target": task["target"], "max_rows": task["train"].get("max_rows"),
              # runs of one suite that differ only in their recipe share the float pretraining
              "pretrain_cache": Path(task["root"]) / PRETRAIN_CACHE if task.get("root") else None}
    metrics_path, ckpt = run_dir / "metrics.json", run_dir / "checkpoint.pt"
    metrics = None
    if task.get("restart"):  # trained before under other settings: start over
        pass
    elif metrics_path.is_file() and ckpt.is_file():  # trained, but the harness stopped before timing
        try:
            metrics = json.loads(metrics_path.read_text())
            load_run(run_dir)
        except (MpqatError, OSError, json.JSONDecodeError):
            metrics = None
    if metrics is None and ckpt.is_file() and not task.get("restart"):
        try:
            metrics = train_run(task["dataset"], recipe, run_dir, resume=True, **kwargs)
        except MpqatError:  # settings changed since, or a half-written run: start it again
            metrics = None
    if metrics is None:
        metrics = train_run(task["dataset"], recipe, run_dir, force=True, **kwargs)
    timing = _timing_kwargs(task)
    if timing is not None:
        from mpqat.bench.timing import measure_step_seconds, torch_threads
        from mpqat.methods import hooks_for
        from mpqat.models import build_model

        run = load_run(run_dir)
        splits = run.splits()
        X, y = splits.X_train, splits.y_train
        # An FP32 twin of the same shape is timed in the same process, interleaved (A B A B, the
        # faster of each pair kept), so the ratio is robust to whatever else the machine is doing.
        fp32, hooks = build_model(run.info["model_spec"]), hooks_for(run.recipe)
        fp32_times, step_times = [], []
        for _ in range(2):
            fp32_times.append(measure_step_seconds(fp32, X, y, **timing))
            step_times.append(measure_step_seconds(run.model, X, y, hooks=hooks, **timing))
        step, fp32_step = min(step_times), min(fp32_times)
        metrics.update(step_seconds=step, fp32_step_seconds=fp32_step, step_ratio_vs_fp32=step / fp32_step,
                       step_batch_size=timing["batch_size"], step_threads=timing["threads"] or torch_threads())
    return metrics


def _train_peer(task: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from mpqat.bench.peers import run_peer
    from mpqat.cost import model_cost
    from mpqat.data import load_dataset
    from mpqat.models import build_model, model_spec

    seed, train = int(task["seed"]), task["train"]
    splits = load_dataset(task["dataset"], target=task["target"], seed=seed, max_rows=train.get("max_rows"))
    spec = model_spec(task["model"], splits.n_features, splits.n_classes, hidden=task["hidden"])
    if "hidden" not in spec:
        raise ConfigError(f"peer '{task['peer']}' runs MLPs only; model '{task['model']}' is not one")
    options = {"patience": int(train["patience"]), **task["options"]}
    result = run_peer(
        task["peer"], splits.X_train, splits.y_train, splits.X_valid, splits.y_valid, splits.X_test, splits.y_test,
        hidden=tuple(spec["hidden"]), epochs=int(train["epochs"]), batch_size=int(train["batch_size"]),
        lr=float(train["lr"]), seed=seed, **options,
    )
    fp32_model = build_model(spec)
    fp32 = model_cost(fp32_model)
    out = result.to_dict()
    metrics: dict[str, Any] = {
        "dataset": task["dataset"], "method": task["peer"], "model": task["model"], "seed": seed,
        **{k: v for k, v in out.items() if k != "extra"},
        "fp32_bitops": fp32.bitops, "fp32_size_bytes": fp32.size_bytes,
        "n_train": len(splits.y_train), "n_test": len(splits.y_test), "hidden": spec["hidden"],
        "peer_options": task["options"], "extra": out.get("extra", {}),
    }
    timing = _timing_kwargs(task)
    if timing is not None:
        metrics.update(_peer_step_time(result.extra.get("model"), fp32_model, splits, metrics.get("step_seconds"),
                                       timing, int(train["batch_size"])))
    _write_json(run_dir / "peer.json", {"peer": task["peer"], "options": options, "result": out})
    return metrics


def _peer_step_time(model: Any, fp32_model: Any, splits: Any, peer_step: float | None, timing: dict[str, Any],
                    batch_size: int) -> dict[str, Any]:
    """Step time of a peer's trained model next to its FP32 twin.

    A PyTorch peer model (Brevitas, torchao) is timed by the harness exactly as mpqat's methods
    are (``step_source: harness``; the adapter's own figure stays in ``peer_step_seconds``).
    Other peers (HGQ2 on Keras) keep the step time their adapter measured during training, with
    the FP32 twin timed at the same batch size and threads (``step_source: peer``).
    """
    from torch import nn

    from mpqat.bench.timing import measure_step_seconds, torch_threads

    X, y = splits.X_train, splits.y_train
    out: dict[str, Any] = {"peer_step_seconds": peer_step}
    keras_model = any(cls.__module__.split(".")[0] in ("keras", "hgq") for cls in type(model).__mro__)
    if isinstance(model, nn.Module) and not keras_model:  # Keras-on-torch models train through Keras, not here
        try:
            fp32_times, step_times = [], []
            for _ in range(2):
                fp32_times.append(measure_step_seconds(fp32_model, X, y, **timing))
                step_times.append(measure_step_seconds(model, X, y, **timing))
            step, fp32_step = min(step_times), min(fp32_times)
            return {**out, "step_seconds": step, "fp32_step_seconds": fp32_step, "step_ratio_vs_fp32": step / fp32_step,
                    "step_batch_size": timing["batch_size"], "step_threads": timing["threads"] or torch_threads(),
                    "step_source": "harness"}
        except Exception as exc:  # a model whose output is not a plain logits tensor: use the peer's figure
            out["step_harness_error"] = f"{type(exc).__name__}: {exc}"
    if not peer_step:
        return out
    fp32_step = measure_step_seconds(fp32_model, X, y, **{**timing, "threads": None, "batch_size": batch_size})
    return {**out, "fp32_step_seconds": fp32_step, "step_ratio_vs_fp32": peer_step / fp32_step,
            "step_batch_size": batch_size, "step_threads": torch_threads(), "step_source": "peer"}


# ------------------------------------------------------------------------------------- backends
def _init_worker(threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


def _run_in_worker(task: dict[str, Any], threads: int | None) -> Outcome:
    _init_worker(threads)
    return execute_run(task)


def run_local(tasks: Sequence[dict[str, Any]], jobs: int) -> Iterator[Outcome]:
    """Run ``tasks`` in a pool of ``jobs`` processes; yields outcomes as they finish."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if not tasks:
        return
    threads = 1 if jobs > 1 else None
    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                               initializer=_init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(execute_run, task): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # the worker process died (killed, out of memory, crashed)
                yield {"key": task["key"], "status": "failed", "seconds": 0.0,
                       "error": f"{type(exc).__name__}: worker process failed ({exc}); run the suite again to retry"}
    except BaseException:  # Ctrl-C or a closed generator: drop what has not started, do not wait for it
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def run_inline(tasks: Sequence[dict[str, Any]], jobs: int = 1) -> Iterator[Outcome]:
    """Run ``tasks`` one after the other in this process."""
    for task in tasks:
        yield execute_run(task)


def import_ray():
    """Import Ray, or raise :class:`MpqatError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MpqatError("the ray backend needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    return ray


def run_ray(tasks: Sequence[dict[str, Any]], jobs: int, address: str | None = None) -> Iterator[Outcome]:
    """Run ``tasks`` as Ray tasks; a local instance with ``jobs`` CPUs unless ``address`` is given.

    ``address``: ``"auto"`` (a cluster started with ``ray start``), ``"ray://host:10001"`` or
    ``"host:6379"``. On a cluster, mpqat (and the datasets) must be installed on every node and
    the output folder should be on a shared filesystem; the driver writes every run's
    ``metrics.json``/``error.json`` locally from the returned outcome in any case.
    """
    ray = import_ray()
    if not tasks:
        return
    started = False
    if not ray.is_initialized():
        try:
            if address is None:
                ray.init(address="local", num_cpus=jobs, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = f"the Ray cluster at '{address}'" if address else "a local Ray instance"
            raise MpqatError(f"cannot start or reach {where}: {exc}") from None
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_run_in_worker)
        threads = 1
        refs = {remote.remote(task, threads): task for task in tasks}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            task = refs[done[0]]
            try:
                outcome = ray.get(done[0])
            except Exception as exc:  # the task's worker died, or Ray could not run it
                outcome = {"key": task["key"], "status": "failed", "seconds": 0.0,
                           "error": f"{type(exc).__name__}: Ray task failed ({str(exc).splitlines()[0] if str(exc) else exc})"}
            yield outcome
    finally:
        if started:
            ray.shutdown()


def backend_runner(backend: str, ray_address: str | None = None) -> Callable[[Sequence[dict[str, Any]], int], Iterator[Outcome]]:
    """The function that runs tasks on ``backend``."""
    if backend == "local":
        return run_local
    if backend == "inline":
        return run_inline
    if backend == "ray":
        import_ray()
        return lambda tasks, jobs: run_ray(tasks, jobs, ray_address)
    raise ConfigError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
