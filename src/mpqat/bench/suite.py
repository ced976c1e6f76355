"""Benchmark suites: a YAML file that names datasets x models x methods x seeds, expanded into runs.

A suite is a YAML mapping (see ``src/mpqat/bench/suites/*.yaml`` for complete examples)::

    name: smoke                      # optional; default: the file's stem
    description: tiny, for CI
    seeds: 1                         # a count (seeds 0..n-1) or an explicit list [0, 1, 2]
    train:                           # shared training settings (TrainConfig fields + max_rows)
      epochs: 2
      batch_size: 64
      lr: 0.003
      patience: 10
      max_rows: 300
    timing: {repeats: 20, warmup: 3}  # step-time measurement (false: off); batch = train.batch_size,
                                     # threads: torch threads while timing (default: as in training)
    models:                          # names from mpqat.models, optionally with hidden widths
      - {name: mlp, hidden: [32, 32]}
    datasets:                        # names from 'mpqat data list', or {name, target, train: {...}}
      - breast-cancer
    methods:
      - label: fp32
        recipe: {method: fp32}
      - label: uniform-w{w_bits}a{a_bits}       # a template, filled from each budget
        recipe: {method: uniform}
        budgets: [{w_bits: 8, a_bits: 8}, {w_bits: 4, a_bits: 4}]
        group: "{w_bits}-bit"                   # budget group: the table bolds the best per group
      - label: nmp-r{budget:g}
        recipe: {method: nmp, reg: bitops}
        budget_field: reg_weight                  # scalar budgets go into this recipe/option field
        budgets: [1.0e-6, 1.0e-5]
      - label: brevitas-w4a4
        peer: brevitas                          # a peer of mpqat.bench.peers instead of a recipe
        options: {w_bits: 4, a_bits: 4}
        group: 4-bit

Method entries may also hold ``train: {...}`` (overrides for that method), ``datasets: [...]``
(run it on these datasets only) and ``note: ...``. Settings are layered suite < dataset < method.
Every run lands in ``OUT/runs/<dataset>/<label>/seed<k>/``; with more than one model in the
suite the label is prefixed by the model's label (``mlp-small-fp32``).

A method whose recipe ``method`` is not registered in this mpqat (not implemented yet) and a peer
that is not installed become *skipped* runs with the reason; a recipe that does not validate
becomes a *failed* run with the error. Neither stops the sweep.

Example:
    >>> suite = load_suite("smoke")
    >>> [run.label for run in expand_suite(suite)][:2]
    ['fp32', 'uniform-w4a4']
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mpqat.errors import ConfigError, MpqatError

SUITES_DIR = Path(__file__).with_name("suites")

#: Training settings a suite may set (TrainConfig fields, plus max_rows for the data).
#: ``pretrain_epochs``, ``pretrain_lr`` (float pretraining before QAT, see mpqat.runs) and
#: ``lr_schedule`` are not in DEFAULT_TRAIN, so suites that do not set them keep their run identities
#: (no stale reruns).
TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "patience", "max_rows", "pretrain_epochs",
              "pretrain_lr", "lr_schedule")
DEFAULT_TRAIN: dict[str, Any] = {"epochs": 30, "batch_size": 256, "lr": 1e-3, "optimizer": "adam",
                                 "weight_decay": 0.0, "patience": 10, "max_rows": None}
DEFAULT_TIMING: dict[str, Any] = {"repeats": 50, "warmup": 5, "threads": None}

_SUITE_KEYS = {"name", "description", "note", "seeds", "train", "timing", "models", "datasets", "methods"}
_METHOD_KEYS = {"label", "recipe", "peer", "options", "budgets", "budget_field", "group", "train", "datasets", "note"}
_DATASET_KEYS = {"name", "key", "target", "train"}
_MODEL_KEYS = {"name", "label", "hidden", "dropout"}
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")


class SuiteError(ConfigError):
    """A suite file that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a suite: what to train, where its directory is, and whether it can run here.

    ``status`` is ``"ready"``, ``"skipped"`` (``reason`` says why: method not registered, peer not
    installed) or ``"invalid"`` (``reason`` holds the validation error; recorded as a failure).
    """

    suite: str
    dataset: str
    dataset_key: str
    target: str | None
    model: str
    model_label: str
    hidden: tuple[int, ...] | None
    dropout: float | None
    label: str
    method_label: str
    kind: str  # "recipe" or "peer"
    method: str
    recipe: dict[str, Any] | None
    peer: str | None
    options: dict[str, Any]
    group: str | None
    budget: dict[str, Any] | None
    seed: int
    train: dict[str, Any]
    timing: dict[str, Any] | None
    status: str = "ready"
    reason: str | None = None
    note: str | None = None

    @property
    def run_dir(self) -> str:
        """Path of the run directory relative to the suite's output folder."""
        return f"runs/{self.dataset_key}/{self.label}/seed{self.seed}"

    @property
    def key(self) -> str:
        """``dataset/label/seedK``: a unique, human-readable id of the run."""
        return f"{self.dataset_key}/{self.label}/seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what a worker process receives)."""
        out = asdict(self)
        out["hidden"] = list(self.hidden) if self.hidden is not None else None
        out["run_dir"] = self.run_dir
        out["key"] = self.key
        return out


@dataclass
class Suite:
    """A parsed suite file (not yet expanded into runs)."""

    name: str
    path: Path | None
    description: str
    seeds: list[int]
    train: dict[str, Any]
    timing: dict[str, Any] | None
    models: list[dict[str, Any]]
    datasets: list[dict[str, Any]]
    methods: list[dict[str, Any]]
    note: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------------------- loading
def list_suites() -> list[str]:
    """Names of the suites shipped with mpqat.

    Example:
        >>> "smoke" in list_suites()
        True
    """
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def resolve_suite(suite: str | Path) -> Path:
    """Path of a suite given by name (``smoke``) or as a path to a YAML file."""
    text = str(suite)
    candidate = Path(text).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file() or "/" in text:
        if not candidate.is_file():
            raise SuiteError(f"suite file '{candidate}' does not exist; shipped suites: {', '.join(list_suites())}")
        return candidate
    shipped = SUITES_DIR / f"{text}.yaml"
    if not shipped.is_file():
        raise SuiteError(f"unknown suite '{text}': choose one of {', '.join(list_suites())}, or pass a path to a YAML file")
    return shipped


def _unknown(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(extra)}; valid keys are {', '.join(sorted(allowed))}")


def _train_block(where: str, data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: 'train' must be a mapping of {', '.join(TRAIN_KEYS)}")
    _unknown(f"{where} train", data, set(TRAIN_KEYS))
    return dict(data)


def parse_seeds(value: Any) -> list[int]:
    """``3`` -> ``[0, 1, 2]``; a list of integers is kept as is."""
    if isinstance(value, bool):
        raise SuiteError(f"seeds must be a positive count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise SuiteError(f"seeds must be at least 1, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise SuiteError(f"seeds list has duplicates: {value}")
        return list(value)
    raise SuiteError(f"seeds must be a positive count or a list of integers, got {value!r}")


def load_suite(suite: str | Path) -> Suite:
    """Read and check a suite file given by name or path (see the module docstring for the format)."""
    path = resolve_suite(suite)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SuiteError(f"suite file '{path}' is not valid YAML{where}: {problem}; quote labels that "
                         "contain braces, e.g. label: \"nmp-r{budget}\"") from None
    return suite_from_dict(data, path)


def suite_from_dict(data: Any, path: Path | None = None) -> Suite:
    """Build a :class:`Suite` from the parsed YAML mapping."""
    where = f"suite '{path}'" if path else "suite"
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: the file must hold a mapping with datasets, models and methods")
    _unknown(where, data, _SUITE_KEYS)
    for key in ("datasets", "methods"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise SuiteError(f"{where}: '{key}' must be a non-empty list")
    train = {**DEFAULT_TRAIN, **_train_block(where, data.get("train"))}
    timing_raw = data.get("timing", {})
    if timing_raw is False or timing_raw is None:
        timing = None
    elif isinstance(timing_raw, dict):
        _unknown(f"{where} timing", timing_raw, {"repeats", "warmup", "batch_size", "threads"})
        timing = {**DEFAULT_TIMING, **timing_raw}
    else:
        raise SuiteError(f"{where}: 'timing' must be a mapping {{repeats, warmup}} or false")
    models = [_parse_model(where, m) for m in (data.get("models") or ["mlp"])]
    labels = [m["label"] for m in models]
    if len(set(labels)) != len(labels):
        raise SuiteError(f"{where}: model labels must be unique, got {labels}; give each a 'label'")
    datasets = [_parse_dataset(where, d) for d in data["datasets"]]
    keys = [d["key"] for d in datasets]
    if len(set(keys)) != len(keys):
        raise SuiteError(f"{where}: datasets must be unique, got {keys}")
    methods = [_parse_method(where, i, m) for i, m in enumerate(data["methods"])]
    return Suite(
        name=str(data.get("name") or (path.stem if path else "suite")), path=path,
        description=str(data.get("description", "")).strip(), seeds=parse_seeds(data.get("seeds", 1)),
        train=train, timing=timing, models=models, datasets=datasets, methods=methods,
        note=data.get("note"), raw=data,
    )


def _parse_model(where: str, item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise SuiteError(f"{where}: each model is a name or a mapping with 'name', got {item!r}")
    _unknown(f"{where} model '{item['name']}'", item, _MODEL_KEYS)
    hidden = item.get("hidden")
    if hidden is not None and (not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden)):
        raise SuiteError(f"{where}: model '{item['name']}' hidden must be a list of positive integers, got {hidden!r}")
    label = str(item.get("label") or item["name"])
    _check_label(where, label)
    return {"name": str(item["name"]), "label": label, "hidden": hidden, "dropout": item.get("dropout")}


def _parse_dataset(where: str, item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise SuiteError(f"{where}: each dataset is a name or a mapping with 'name', got {item!r}")
    _unknown(f"{where} dataset '{item['name']}'", item, _DATASET_KEYS)
    name = str(item["name"])
    key = str(item.get("key") or (Path(name).stem if "/" in name or "." in name else name))
    _check_label(where, key)
    return {"name": name, "key": key, "target": item.get("target"),
            "train": _train_block(f"{where} dataset '{name}'", item.get("train"))}


def _parse_method(where: str, index: int, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict) or "label" not in item:
        raise SuiteError(f"{where}: method #{index + 1} must be a mapping with a 'label', got {item!r}")
    here = f"{where} method '{item['label']}'"
    _unknown(here, item, _METHOD_KEYS)
    if ("recipe" in item) == ("peer" in item):
        raise SuiteError(f"{here}: give exactly one of 'recipe' (a mapping with 'method') or 'peer' (a peer name)")
    if "recipe" in item and (not isinstance(item["recipe"], dict) or "method" not in item["recipe"]):
        raise SuiteError(f"{here}: 'recipe' must be a mapping with a 'method' key, e.g. {{method: uniform, w_bits: 4}}")
    if "recipe" in item and "options" in item:
        raise SuiteError(f"{here}: 'options' are for peers; put recipe fields into 'recipe'")
    options = item.get("options") or {}
    if not isinstance(options, dict):
        raise SuiteError(f"{here}: 'options' must be a mapping")
    budgets = item.get("budgets")
    if budgets is not None:
        if not isinstance(budgets, list) or not budgets:
            raise SuiteError(f"{here}: 'budgets' must be a non-empty list")
        if all(isinstance(b, dict) for b in budgets):
            if "budget_field" in item:
                raise SuiteError(f"{here}: 'budget_field' is for scalar budgets; mapping budgets name their fields")
        elif any(isinstance(b, dict | list) for b in budgets):
            raise SuiteError(f"{here}: 'budgets' must be all scalars (with 'budget_field') or all mappings")
        elif "budget_field" not in item:
            raise SuiteError(f"{here}: scalar 'budgets' need a 'budget_field' naming the recipe/option field they set")
    datasets = item.get("datasets")
    if datasets is not None and (not isinstance(datasets, list) or not datasets):
        raise SuiteError(f"{here}: 'datasets' must be a non-empty list of dataset names")
    return {
        "label": str(item["label"]), "recipe": item.get("recipe"), "peer": item.get("peer"),
        "options": dict(options), "budgets": budgets, "budget_field": item.get("budget_field"),
        "group": item.get("group"), "train": _train_block(here, item.get("train")),
        "datasets": datasets, "note": item.get("note"),
    }


def _check_label(where: str, label: str) -> None:
    if not _LABEL_RE.match(label):
        raise SuiteError(
            f"{where}: '{label}' cannot name a run directory: use letters, digits and . _ + = @ - only"
        )


# -------------------------------------------------------------------------------------- expansion
def _fill(template: str, values: dict[str, Any], where: str) -> str:
    try:
        return string.Formatter().vformat(template, (), values)
    except (KeyError, IndexError) as exc:
        raise SuiteError(f"{where}: template '{template}' names {exc}, which the budget does not define") from None
    except (ValueError, TypeError) as exc:
        raise SuiteError(f"{where}: cannot fill template '{template}': {exc}") from None


def _budget_entries(method: dict[str, Any]) -> list[tuple[dict[str, Any] | None, dict[str, Any]]]:
    """``(budget overrides, template values)`` for each budget of a method entry (one None if none)."""
    budgets = method["budgets"]
    if budgets is None:
        return [(None, {})]
    out = []
    for b in budgets:
        if isinstance(b, dict):
            compact = ",".join(f"{k}={v}" for k, v in b.items())
            out.append((dict(b), {**b, "budget": compact}))
        else:
            out.append(({method["budget_field"]: b}, {method["budget_field"]: b, "budget": b}))
    return out


def method_registered(method: str) -> bool:
    """True when the recipe ``method`` is registered here (importing ``mpqat.methods.<method>`` if needed)."""
    import mpqat  # noqa: F401  (registers the built-in recipes)
    from mpqat.recipes import recipe_methods

    if method in recipe_methods():
        return True
    if re.fullmatch(r"[a-z_][a-z0-9_]*", method):
        try:
            importlib.import_module(f"mpqat.methods.{method}")
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("mpqat.methods"):
                raise
    return method in recipe_methods()


def peer_availability() -> dict[str, str | None]:
    """Peer name -> None when it can run here, else the reason (and how to install it)."""
    try:
        from mpqat.bench.peers import available_peers
    except ImportError as exc:
        return {"*": f"the peer adapters (mpqat.bench.peers) cannot be imported: {exc}"}
    return dict(available_peers())


def expand_suite(
    suite: Suite,
    seeds: Sequence[int] | None = None,
    filter: str | Iterable[str] | None = None,  # noqa: A002  (the public name the CLI uses)
    check: bool = True,
) -> list[RunSpec]:
    """Every run of ``suite`` (datasets x models x methods x budgets x seeds), in a stable order.

    ``seeds`` overrides the suite's seeds; ``filter`` keeps runs matching any of the glob
    patterns against ``dataset/label``, ``label`` or ``dataset`` (``"adult/*"``, ``"nmp*"``).
    ``check`` resolves each run's status (registered method, installed peer, valid recipe).
    """
    seed_list = list(seeds) if seeds is not None else suite.seeds
    patterns = [filter] if isinstance(filter, str) else list(filter or [])
    registered: dict[str, bool] = {}
    peers: dict[str, str | None] | None = None
    validated: dict[str, tuple[str, str | None, dict[str, Any] | None]] = {}
    runs: list[RunSpec] = []
    multi_model = len(suite.models) > 1
    seen: dict[str, str] = {}
    for ds in suite.datasets:
        for model in suite.models:
            for index, method in enumerate(suite.methods):
                if method["datasets"] is not None and ds["name"] not in method["datasets"] and ds["key"] not in method["datasets"]:
                    continue
                for overrides, values in _budget_entries(method):
                    where = f"suite '{suite.name}' method '{method['label']}'"
                    method_label = _fill(method["label"], values, where)
                    label = f"{model['label']}-{method_label}" if multi_model else method_label
                    _check_label(where, label)
                    path_key = f"{ds['key']}/{label}"
                    ident = repr((index, overrides))
                    if seen.setdefault(path_key, ident) != ident:
                        raise SuiteError(f"{where}: label '{label}' is used twice on {ds['key']}; "
                                         "put the budget into the label, e.g. 'nmp-r{budget}'")
                    group = _fill(str(method["group"]), values, where) if method["group"] is not None else None
                    train = {**suite.train, **ds["train"], **method["train"]}
                    if method["recipe"] is not None:
                        recipe = {**method["recipe"], **(overrides or {})}
                        kind, name, peer, options = "recipe", str(recipe["method"]), None, {}
                    else:
                        recipe, kind, name, peer = None, "peer", str(method["peer"]), str(method["peer"])
                        options = {**method["options"], **(overrides or {})}
                    status, reason = "ready", None
                    if check and kind == "recipe":
                        if name not in registered:
                            registered[name] = method_registered(name)
                        if not registered[name]:
                            status, reason = "skipped", f"method '{name}' is not registered in this mpqat (not implemented yet)"
                        else:
                            recipe_key = repr(sorted(recipe.items(), key=lambda kv: kv[0]))
                            if recipe_key not in validated:
                                validated[recipe_key] = _validate_recipe(recipe)
                            status, reason, normalised = validated[recipe_key]
                            recipe = normalised or recipe
                    elif check and kind == "peer":
                        peers = peer_availability() if peers is None else peers
                        if "*" in peers:
                            status, reason = "skipped", peers["*"]
                        elif peer not in peers:
                            status, reason = "invalid", f"unknown peer '{peer}': choose one of {', '.join(peers)}"
                        elif peers[peer] is not None:
                            status, reason = "skipped", f"{peer} not available: {peers[peer]}"
                    for seed in seed_list:
                        spec = RunSpec(
                            suite=suite.name, dataset=ds["name"], dataset_key=ds["key"], target=ds["target"],
                            model=model["name"], model_label=model["label"],
                            hidden=tuple(model["hidden"]) if model["hidden"] is not None else None,
                            dropout=model["dropout"], label=label, method_label=method_label, kind=kind,
                            method=name, recipe=recipe, peer=peer, options=options, group=group,
                            budget=overrides, seed=int(seed), train=dict(train), timing=suite.timing,
                            status=status, reason=reason, note=method["note"],
                        )
                        if patterns and not _matches(spec, patterns):
                            continue
                        runs.append(spec)
    return runs


def _validate_recipe(recipe: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None]:
    from mpqat.recipes import recipe_from_dict

    try:
        return "ready", None, recipe_from_dict(recipe).to_dict()
    except MpqatError as exc:
        return "invalid", f"invalid recipe {recipe}: {exc}", None
    except Exception as exc:  # a recipe's own __post_init__ may raise anything
        return "invalid", f"invalid recipe {recipe}: {type(exc).__name__}: {exc}", None


def _matches(spec: RunSpec, patterns: list[str]) -> bool:
    names = (f"{spec.dataset_key}/{spec.label}", spec.label, spec.dataset_key, spec.key)
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def check_environment(runs: Sequence[RunSpec]) -> None:
    """Fail fast, before any training, on models this mpqat lacks and datasets not fetched yet."""
    from mpqat.models import MODEL_NAMES

    from mpqat.data.registry import find_dataset

    problems = []
    models = sorted({r.model for r in runs if r.model not in MODEL_NAMES})
    if models:
        problems.append(f"model(s) {', '.join(models)}, which this mpqat does not have (known: {', '.join(MODEL_NAMES)})")

    unknown, missing = [], []
    for name in sorted({r.dataset for r in runs if r.status == "ready"}):
        if "/" in name or Path(name).suffix:
            if not Path(name).expanduser().is_file():
                missing.append(f"{name} (file not found)")
            continue
        info = find_dataset(name)
        if info is None:
            unknown.append(name)
        elif not info.is_fetched:
            missing.append(name)
    if unknown:
        problems.append(f"dataset(s) {', '.join(unknown)}, which this mpqat does not know (see 'mpqat data list')")
    if problems:
        raise SuiteError("the suite needs " + "; and ".join(problems))
    if missing:
        raise SuiteError(f"dataset(s) {', '.join(missing)} are not fetched yet: run 'mpqat data fetch all' "
                         "(or 'mpqat data fetch NAME'), or leave them out with --only")
