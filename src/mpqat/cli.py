"""The ``mpqat`` command line: ``data``, ``train``, ``eval``, ``report``, ``export``, ``run``, ``inspect``, ``bench``.

Every user error is printed as one line ``mpqat: error: ...`` with exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from mpqat.errors import ConfigError, MpqatError

# Map from CLI flag to recipe field, applied when the method's recipe has that field.
_FLAG_FIELDS = {"w_bits": "w_bits", "a_bits": "a_bits"}


def _parse_set(values: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    return out


def _build_recipe(method: str | None, config: str | None, overrides: dict[str, Any]):
    from mpqat.recipes import load_recipe, recipe_from_dict

    if config:
        base = load_recipe(config).to_dict()
        if method and method != base["method"]:
            raise ConfigError(f"--method {method} disagrees with the recipe file's method '{base['method']}'")
    else:
        base = {"method": method or "uniform"}
    base.update(overrides)
    return recipe_from_dict(base)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mpqat")
def cli() -> None:
    """Mixed-precision quantization-aware training with bit-exact integer export."""


@cli.group()
def data() -> None:
    """List and fetch datasets."""


@data.command("list")
def data_list() -> None:
    """List the named datasets and whether they are fetched."""
    from mpqat.data import list_datasets

    for info in list_datasets():
        status = "fetched" if info.is_fetched else "not fetched"
        click.echo(f"{info.name:16s} {status:12s} {info.task:24s} {info.source}")


@data.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Fetch again even if cached.")
@click.option("--archive", default=None, type=click.Path(), help="tabpfn-v1 only: use this tabpfn-0.1.tar.gz, no download.")
def data_fetch(name: str, force: bool, archive: str | None) -> None:
    """Fetch dataset NAME (or 'all'), or the TabPFN v1 checkpoint ('tabpfn-v1'), into the cache ($MPQAT_DATA or ~/.cache/mpqat)."""
    if name.strip().lower() == "tabpfn-v1":
        from mpqat.tabpfn.fetch import fetch_checkpoint

        click.echo(f"fetched {name} -> {fetch_checkpoint(force=force, archive=archive)}")
        return
    if archive is not None:
        raise ConfigError("--archive applies to 'mpqat data fetch tabpfn-v1' only")
    from mpqat.data import fetch

    path = fetch(name, force=force)
    click.echo(f"fetched {name} -> {path}")


@cli.command()
@click.option("--dataset", required=True, help="A dataset name (see 'mpqat data list') or a CSV/Parquet path.")
@click.option("--target", default=None, help="Target column, for a CSV/Parquet dataset.")
@click.option("--method", default=None, help="fp32, uniform, nmp, ... (default: the --config's, else uniform).")
@click.option("--config", default=None, type=click.Path(), help="Recipe YAML file.")
@click.option("--w-bits", type=int, default=None, help="Weight bits (uniform).")
@click.option("--a-bits", type=int, default=None, help="Activation bits (uniform).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe field, repeatable.")
@click.option("--bitops-budget", type=float, default=None,
              help="BitOps budget as a fraction of the FP32 BitOps, e.g. 0.015625 = the cost of W4A4 "
                   "(smpq, dnas: sets budget_kind=bitops_rel and budget).")
@click.option("--avg-bits", type=float, default=None,
              help="Average weight-bit budget, e.g. 2.81 (adq: avg_bits; hawq: budget with budget_kind=avg_bits).")
@click.option("--model", default="mlp", show_default=True,
              help="mlp, mlp-small or mlp-large (4x512, as the NMP-QAT paper); for image datasets lenet5, resnet8 or "
                   "resnet20; for I/Q frames cnn1d; tabpfn-v1 for the pretrained TabPFN (in-context, episodic QAT).")
@click.option("--hidden", default=None, help="Hidden widths, e.g. 256,256.")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--pretrain-epochs", type=int, default=0, show_default=True,
              help="Train the FLOAT model (with BatchNorm) this many epochs first, then quantize (folding BN) "
                   "and run QAT for --epochs.")
@click.option("--pretrain-lr", type=float, default=None,
              help="Learning rate of the float pretraining (default: --lr, which is then the QAT phase's).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="cosine: the lr decays per step to 0 over the epochs of each phase.")
@click.option("--optimizer", default="adam", show_default=True)
@click.option("--patience", type=int, default=10, show_default=True, help="Early-stopping patience (epochs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-rows", type=int, default=None, help="Subsample the dataset (quick tries).")
@click.option("--out", required=True, type=click.Path(), help="Run directory.")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--weights-only", is_flag=True,
              help="tabpfn-v1: quantize the weights only (activations stay float); --epochs counts fine-tuning episodes.")
@click.option("--nproc", type=int, default=None,
              help="Train data-parallel on N local processes (launches torchrun; --batch-size is the global batch).")
def train(dataset, target, method, config, w_bits, a_bits, sets, bitops_budget, model, hidden, epochs, batch_size,
          lr, optimizer, patience, seed, max_rows, out, force, resume, quiet, nproc, pretrain_epochs,
          avg_bits=None, weights_only=False, pretrain_lr=None, lr_schedule="constant") -> None:
    """Train a (quantized) model and write DIR/metrics.json, DIR/checkpoint.pt and DIR/recipe.yaml.

    Under ``torchrun --nproc-per-node N -m mpqat train ...`` (or with ``--nproc N``) it trains with
    DistributedDataParallel; see ``mpqat.distributed``.
    """
    from mpqat.runs import train_run
    from mpqat.train import TrainConfig

    if nproc is not None and "WORLD_SIZE" not in os.environ:
        from mpqat.distributed import launch_local, strip_option

        code = launch_local(nproc, strip_option(sys.argv[1:], "--nproc"))
        if code != 0:
            raise click.exceptions.Exit(code)
        return

    overrides = _parse_set(sets)
    for flag, value in (("w_bits", w_bits), ("a_bits", a_bits)):
        if value is not None:
            overrides[_FLAG_FIELDS[flag]] = value
    if bitops_budget is not None:
        overrides.update(budget_kind="bitops_rel", budget=bitops_budget)
    if avg_bits is not None:
        overrides.update(_avg_bits_fields(method, config, avg_bits))
    if model == "tabpfn-v1":  # pretrained in-context model: its own evaluator / episodic trainer
        from click.core import ParameterSource

        from mpqat.tabpfn.run import FINETUNE_LR, summary_line, tabpfn_recipe_overrides, train_tabpfn_run

        if resume or nproc:
            raise ConfigError("--resume and --nproc are not supported with --model tabpfn-v1")
        recipe = _build_recipe(method, config, overrides if config else tabpfn_recipe_overrides(method or "uniform", overrides))
        lr_given = click.get_current_context().get_parameter_source("lr") != ParameterSource.DEFAULT
        metrics = train_tabpfn_run(dataset, recipe, out, episodes=epochs, lr=lr if lr_given else FINETUNE_LR, seed=seed,
                                   activations=not weights_only, target=target, max_rows=max_rows, force=force,
                                   progress=not quiet)
        click.echo(summary_line(metrics))
        click.echo(f"saved run to {out}")
        return
    recipe = _build_recipe(method, config, overrides)
    hidden_list = _parse_hidden(hidden)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, patience=patience,
                      seed=seed, progress=not quiet, pretrain_epochs=pretrain_epochs, pretrain_lr=pretrain_lr,
                      lr_schedule=lr_schedule)
    metrics = train_run(dataset, recipe, out, model=model, hidden=hidden_list, config=cfg, target=target,
                        force=force, resume=resume, max_rows=max_rows)
    from mpqat.distributed import is_main_process

    if is_main_process():  # under torchrun, rank 0 speaks for all
        click.echo(_summary_line(metrics))
        click.echo(f"saved run to {out}")


def _avg_bits_fields(method: str | None, config: str | None, value: float) -> dict[str, Any]:
    """The recipe fields that ``--avg-bits`` sets: ``avg_bits`` (adq), or ``budget`` + ``budget_kind`` (hawq)."""
    import dataclasses

    from mpqat.recipes import load_recipe, recipe_from_dict

    name = method or (load_recipe(config).method if config else "uniform")
    fields = {f.name for f in dataclasses.fields(recipe_from_dict({"method": name}))}
    if "avg_bits" in fields:
        return {"avg_bits": value}
    if {"budget", "budget_kind"} <= fields:
        return {"budget_kind": "avg_bits", "budget": value}
    raise ConfigError(f"--avg-bits does not apply to the '{name}' method (it has no average weight-bit budget); "
                      "use --method adq, hawq, smpq or dnas, or --w-bits for fixed bits")


def _parse_hidden(hidden: str | None) -> list[int] | None:
    if hidden is None:
        return None
    try:
        widths = [int(h) for h in hidden.split(",") if h.strip()]
    except ValueError:
        raise ConfigError(f"--hidden expects comma-separated integers such as 256,256, got '{hidden}'") from None
    if not widths or min(widths) < 1:
        raise ConfigError("--hidden needs at least one positive width")
    return widths


def _summary_line(m: dict[str, Any]) -> str:
    return (f"{m['dataset']} {m['method']}: test accuracy {m['test_accuracy']:.4f}, "
            f"avg bits w {m['avg_weight_bits']:.2f} / a {m['avg_act_bits']:.2f}, "
            f"BitOps {m['bitops']:.3g} ({m['bitops'] / m['fp32_bitops']:.2%} of FP32), "
            f"size {m['size_bytes']:.0f} B ({m['size_bytes'] / m['fp32_size_bytes']:.2%} of FP32)")


@cli.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(run_dir: str, as_json: bool) -> None:
    """Evaluate a finished run on its test split again and compare with metrics.json."""
    from mpqat.metrics import classification_metrics
    from mpqat.runs import load_run
    from mpqat.train import predict_logits

    run = load_run(run_dir)
    splits = run.splits()
    result = classification_metrics(predict_logits(run.model, splits.X_test), splits.y_test)
    result["matches_metrics_json"] = result["test_accuracy"] == run.metrics.get("test_accuracy")
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


@cli.command()
@click.argument("run_dir", type=click.Path())
def report(run_dir: str) -> None:
    """Summarise a run and draw its plots (bit-width heatmaps, bits over epochs) into RUN_DIR."""
    from mpqat.report import write_report

    for path in write_report(Path(run_dir)):
        click.echo(f"wrote {path}")


@cli.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_mpq", required=True, type=click.Path(), help="The .mpq file to write.")
@click.option("--onnx", "onnx_path", default=None, type=click.Path(), help="Also write an ONNX model.")
@click.option("--c", "c_dir", default=None, type=click.Path(), help="Also write C99 sources into this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export_cmd(run_dir: str, out_mpq: str, onnx_path: str | None, c_dir: str | None, as_json: bool) -> None:
    """Export a finished run to a bit-packed integer graph (.mpq), checked bit for bit on its test split."""
    from mpqat.export.commands import export_run

    result = export_run(run_dir, out_mpq, onnx_path=onnx_path, c_dir=c_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        for key, value in result.items():
            click.echo(f"{key}: {value}")


@cli.command("run")
@click.argument("mpq_path", type=click.Path())
@click.option("--dataset", required=True, help="Dataset name or CSV/Parquet path.")
@click.option("--target", default=None, help="Target column, for a CSV/Parquet dataset.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split seed (use the run's seed).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def run_cmd(mpq_path: str, dataset: str, target: str | None, seed: int, as_json: bool) -> None:
    """Evaluate an exported .mpq model on a dataset's test split with the integer-only engine."""
    from mpqat.export.commands import run_graph

    result = run_graph(mpq_path, dataset, target=target, seed=seed)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


@cli.command("inspect")
@click.argument("mpq_path", type=click.Path())
def inspect_cmd(mpq_path: str) -> None:
    """Describe an .mpq file: layers, bit-width histograms, bytes per part."""
    from mpqat.export.commands import inspect_graph

    click.echo(inspect_graph(mpq_path))


@cli.command()
@click.option("--suite", required=True, help="A shipped suite (smoke, tabular, nmp, vision, fashion-mnist, adq-tabular, smpq) or a YAML file.")
@click.option("--seeds", type=int, default=None, help="Seeds 0..N-1 (default: the suite's).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Runs in parallel.")
@click.option("--out", type=click.Path(), default=None, help="Output folder (default: benchmarks/SUITE).")
@click.option("--backend", type=click.Choice(["local", "ray", "inline"]), default="local", show_default=True)
@click.option("--ray-address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--only", multiple=True, metavar="GLOB", help="Train only DATASET/LABEL matching GLOB (repeatable).")
def bench(suite, seeds, jobs, out, backend, ray_address, only) -> None:
    """Run a benchmark suite; write results.json, summary.json, table.md, plots/ and README.md."""
    from mpqat.bench import cli_bench

    result = cli_bench(suite, seeds=seeds, jobs=jobs, out=out, backend=backend, ray_address=ray_address, only=only)
    if isinstance(result, dict) and result.get("failures"):
        raise MpqatError(f"{len(result['failures'])} benchmark run(s) failed; see their error.json files")


def main() -> None:
    """Console entry point: run the CLI, turning user errors into one-line messages with exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except MpqatError as exc:
        click.echo(f"mpqat: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("mpqat: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("mpqat: interrupted; continue a training run with --resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
