"""In-context prediction with TabPFN v1: input preprocessing, ensembling, ``predict_proba``.

TabPFN "trains" by reading labelled context rows; :class:`InContextClassifier` keeps the context
(at most ``max_context`` = 1000 rows, the v1 limit, drawn stratified when the training set is
larger) and predicts query rows in one forward pass per ensemble member.

Preprocessing of one (context, query) pair, every statistic taken from the **context rows only**
(the TabPFN v1 recipe, re-implemented; :func:`preprocess`):

1. standardise every feature with the context mean and (n-1) standard deviation (+1e-6), clip
   to +-100;
2. drop features that are constant on the context;
3. ``transform="power"``: a Yeo-Johnson power transform (scikit-learn ``PowerTransformer``,
   standardised) fitted per feature on the context; a feature whose fit fails or warns is kept
   as it is (as in v1);
4. soft outlier squashing at 4 sigma: the bounds come from the context mean/std computed without
   the values beyond 4 sigma; a value past a bound ``u`` becomes ``u + log(1 + |x|)`` (and
   symmetrically below);
5. rescale by ``100 / n_used_features`` (v1 was trained with features scaled to the number used),
   then pad with zero features up to 100.

Ensemble (v1's ``multiclass_decoder="permutation"``, ``feature_shift_decoder=True``,
``preprocess_transform="mix"``): each member rotates the feature order by ``feature_shift`` and
relabels the classes ``y -> (y + class_shift) mod K`` (the output is rotated back), with
preprocessing ``none`` or ``power``. The shifts are seeded permutations; members are the first
``n_ensemble`` of (shuffled shift pairs) x (none, power). The members' logits, divided by the
softmax temperature 0.8, are averaged, then passed through a softmax (v1's ``average_logits``).

Example:
    >>> import numpy as np, torch
    >>> from mpqat.tabpfn.model import TabPFN, TabPFNConfig
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(40, 5)).astype("float32"), np.arange(40) % 2
    >>> clf = InContextClassifier(TabPFN(TabPFNConfig.tiny()), n_ensemble=2).fit(X[:30], y[:30])
    >>> clf.predict_proba(X[30:]).shape
    (10, 2)
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mpqat.errors import ConfigError, DatasetError

MAX_CONTEXT = 1000
TRANSFORMS = ("none", "power")
SOFTMAX_TEMPERATURE = 0.8
OUTLIER_SIGMA = 4.0


def _std(x: np.ndarray) -> np.ndarray:
    return x.std(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1], dtype=x.dtype)


def _power_transform(ctx: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Yeo-Johnson per column fitted on ``ctx``; columns whose fit fails or warns stay as they are."""
    from sklearn.preprocessing import PowerTransformer  # deferred: slow import

    out = full.copy()
    for col in range(full.shape[1]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                pt = PowerTransformer(standardize=True).fit(ctx[:, col : col + 1].astype(np.float64))
                trans = pt.transform(full[:, col : col + 1].astype(np.float64))
        except (ValueError, ArithmeticError, Warning):
            continue
        if np.all(np.isfinite(trans)):
            out[:, col : col + 1] = trans
    return out


def squash_outliers(full: np.ndarray, n_ctx: int, n_sigma: float = OUTLIER_SIGMA) -> np.ndarray:
    """Soft outlier squashing with bounds from the context rows (step 4 of the module docstring)."""
    ctx = full[:n_ctx]
    mean, std = ctx.mean(0), _std(ctx)
    lower, upper = mean - n_sigma * std, mean + n_sigma * std
    inside = (ctx >= lower) & (ctx <= upper)
    count = inside.sum(0)
    clean_mean = np.where(inside, ctx, 0.0).sum(0) / np.maximum(count, 1)
    dev = np.where(inside, ctx - clean_mean, 0.0)
    clean_std = np.sqrt((dev**2).sum(0) / np.maximum(count - 1, 1))
    lower, upper = clean_mean - n_sigma * clean_std, clean_mean + n_sigma * clean_std
    out = np.maximum(-np.log1p(np.abs(full)) + lower, full)
    return np.minimum(np.log1p(np.abs(out)) + upper, out)


def preprocess(X_ctx: np.ndarray, X_query: np.ndarray, transform: str = "none", max_features: int = 100) -> np.ndarray:
    """Preprocess context and query rows together, fitted on the context: ``[n_ctx + n_query, n_used]``.

    Not padded (see :func:`pad_features`). ``transform``: ``none`` or ``power``.
    """
    if transform not in TRANSFORMS:
        raise ConfigError(f"transform={transform!r}: choose one of {', '.join(TRANSFORMS)}")
    n_ctx = len(X_ctx)
    full = np.concatenate([X_ctx, X_query], axis=0).astype(np.float64)
    full = np.clip((full - full[:n_ctx].mean(0)) / (_std(full[:n_ctx]) + 1e-6), -100.0, 100.0)
    ctx = full[:n_ctx]
    keep = (ctx.max(0) > ctx.min(0)) if n_ctx else np.zeros(full.shape[1], dtype=bool)
    full = full[:, keep]
    if full.shape[1] == 0:  # nothing varies on the context: one all-zero feature
        return np.zeros((full.shape[0], 1), dtype=np.float32)
    if transform == "power":
        full = _power_transform(full[:n_ctx], full)
    full = squash_outliers(full, n_ctx)
    full = full * (max_features / full.shape[1])
    return full.astype(np.float32)


def pad_features(x: np.ndarray, n_features: int) -> np.ndarray:
    """Pad ``[..., f]`` with zero features up to ``n_features``."""
    if x.shape[-1] > n_features:
        raise DatasetError(f"{x.shape[-1]} features after preprocessing, but TabPFN v1 takes at most {n_features}")
    pad = [(0, 0)] * (x.ndim - 1) + [(0, n_features - x.shape[-1])]
    return np.pad(x, pad)


class OrdinalFromOneHot:
    """Collapse the one-hot groups ``col=value`` of mpqat's preprocessed features into one ordinal
    column each (the index of the hot value, -1 for an unseen value); other columns pass through.

    TabPFN v1 was trained on numeric features with categorical ones given as ordinal codes, and is
    limited to 100 features: on mlc-churn (51 states one-hot, 73 features) the ordinal form scored
    0.921 against 0.897 with one-hot (seed 0, 4 members), on telco-churn 0.796 against 0.795.

    Example:
        >>> enc = OrdinalFromOneHot(["a", "c=x", "c=y", "c=z"])
        >>> enc.transform(np.array([[0.5, 0, 0, 1], [1.5, 0, 0, 0]], dtype=np.float32)).tolist()
        [[0.5, 2.0], [1.5, -1.0]]
    """

    def __init__(self, feature_names: list[str]) -> None:
        self.columns: list[tuple[str, list[int]]] = []
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(feature_names):
            base, sep, _ = name.partition("=")
            if sep:
                if base not in groups:
                    groups[base] = []
                    self.columns.append((base, groups[base]))
                groups[base].append(i)
            else:
                self.columns.append((name, [i]))
        self.groups = {base for base in groups}
        self.n_in = len(feature_names)

    @property
    def feature_names(self) -> list[str]:
        return [name for name, _ in self.columns]

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_in:
            raise DatasetError(f"expected {self.n_in} one-hot-encoded features, got an array of shape {X.shape}")
        out = np.empty((len(X), len(self.columns)), dtype=np.float32)
        for j, (name, idx) in enumerate(self.columns):
            if name in self.groups:
                sub = X[:, idx]
                out[:, j] = np.where(sub.max(1) > 0, sub.argmax(1), -1)
            else:
                out[:, j] = X[:, idx[0]]
        return out


@dataclass(frozen=True)
class Member:
    """One ensemble member: class relabelling, feature rotation, preprocessing."""

    class_shift: int
    feature_shift: int
    transform: str


def ensemble_members(n_classes: int, n_features: int, n_ensemble: int, seed: int = 0,
                     transforms: tuple[str, ...] = TRANSFORMS) -> list[Member]:
    """The first ``n_ensemble`` of (shuffled (class shift, feature shift) pairs) x ``transforms``."""
    if n_ensemble < 1:
        raise ConfigError(f"n_ensemble={n_ensemble} must be >= 1")
    rng = np.random.default_rng(seed)
    pairs = list(itertools.product(rng.permutation(n_classes).tolist(), rng.permutation(max(n_features, 1)).tolist()))
    order = rng.permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    members = []
    for (cs, fs), tr in itertools.product(shuffled, transforms):
        members.append(Member(int(cs), int(fs), tr))
        if len(members) == n_ensemble:
            break
    return members


def stratified_context(y: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a stratified random subset of ``size`` rows (all rows if fewer)."""
    n = len(y)
    if size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.maximum(1, np.floor(counts / n * size).astype(int))
    while quota.sum() > size:  # more classes than rows left: trim the largest quotas
        quota[np.argmax(quota)] -= 1
    rest = size - quota.sum()
    frac = counts / n * size - np.floor(counts / n * size)
    for i in np.argsort(-frac)[:rest]:
        quota[i] += 1
    picks = [rng.choice(np.flatnonzero(y == c), size=min(q, cnt), replace=False)
             for c, q, cnt in zip(classes, quota, counts, strict=True)]
    return np.sort(np.concatenate(picks))


def member_inputs(prepped: np.ndarray, y_ctx: np.ndarray, member: Member, n_classes: int,
                  n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """One member's padded features ``[N, n_features]`` and shifted context labels ``[n_ctx]``."""
    x = np.roll(prepped, -member.feature_shift, axis=-1) if prepped.shape[-1] > 1 else prepped
    y = (y_ctx + member.class_shift) % n_classes
    return pad_features(x, n_features), y.astype(np.float32)


def unshift_logits(logits: torch.Tensor, class_shift: int) -> torch.Tensor:
    """Undo ``y -> (y + s) mod K`` on ``[..., K]`` logits: class ``c`` reads output ``(c + s) mod K``."""
    return torch.roll(logits, -class_shift, dims=-1)


class InContextClassifier:
    """scikit-learn-like classifier around a TabPFN (float or quantized): ``fit`` stores the context.

    ``n_ensemble`` members (module docstring); ``max_context`` rows at most (stratified subsample,
    seeded by ``seed``); query rows in chunks of ``query_batch``; ``member_batch`` members per
    forward pass.
    """

    def __init__(self, model: nn.Module, n_ensemble: int = 4, max_context: int = MAX_CONTEXT, seed: int = 0,
                 temperature: float = SOFTMAX_TEMPERATURE, query_batch: int = 2048, member_batch: int = 2,
                 transforms: tuple[str, ...] = TRANSFORMS) -> None:
        if not 1 <= max_context <= MAX_CONTEXT:
            raise ConfigError(f"max_context={max_context}: TabPFN v1 takes 1..{MAX_CONTEXT} context rows")
        self.model = model
        self.n_ensemble = n_ensemble
        self.max_context = max_context
        self.seed = seed
        self.temperature = temperature
        self.query_batch = query_batch
        self.member_batch = member_batch
        self.transforms = transforms
        cfg = getattr(model, "config", None)
        self.n_features = cfg.n_features if cfg is not None else 100
        self.n_out = cfg.n_out if cfg is not None else 10

    def fit(self, X: np.ndarray, y: np.ndarray) -> InContextClassifier:
        """Keep (a stratified subsample of at most ``max_context`` rows of) ``X, y`` as the context."""
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        if X.ndim != 2 or len(X) != len(y) or len(y) < 2:
            raise DatasetError(f"fit needs X [n, f] and y [n] with n >= 2, got {X.shape} and {y.shape}")
        if X.shape[1] > self.n_features:
            raise DatasetError(f"{X.shape[1]} features: TabPFN v1 takes at most {self.n_features}; select features first")
        self.classes_ = np.unique(y)
        if len(self.classes_) > self.n_out:
            raise DatasetError(f"{len(self.classes_)} classes: TabPFN v1 predicts at most {self.n_out}")
        keep = stratified_context(y, self.max_context, self.seed)
        self.X_ctx = X[keep]
        self.y_ctx = np.searchsorted(self.classes_, y[keep]).astype(np.int64)
        self.members = ensemble_members(len(self.classes_), X.shape[1], self.n_ensemble, self.seed, self.transforms)
        return self

    @torch.no_grad()
    def predict_logits(self, X: np.ndarray) -> np.ndarray:
        """Log-probabilities ``[n, n_classes]`` (averaged member logits / temperature, log-softmax)."""
        if not hasattr(self, "X_ctx"):
            raise ConfigError("call fit(X, y) before predicting")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.X_ctx.shape[1]:
            raise DatasetError(f"X has shape {X.shape}, the context has {self.X_ctx.shape[1]} features")
        was_training = self.model.training
        self.model.eval()
        try:
            chunks = [self._predict_chunk(X[i : i + self.query_batch]) for i in range(0, len(X), self.query_batch)]
        finally:
            self.model.train(was_training)
        return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, len(self.classes_)), dtype=np.float32)

    def _predict_chunk(self, Xq: np.ndarray) -> np.ndarray:
        k = len(self.classes_)
        prepped = {t: preprocess(self.X_ctx, Xq, t, self.n_features) for t in {m.transform for m in self.members}}
        total = torch.zeros(len(Xq), k)
        for start in range(0, len(self.members), self.member_batch):
            group = self.members[start : start + self.member_batch]
            xs, ys = zip(*(member_inputs(prepped[m.transform], self.y_ctx, m, k, self.n_features) for m in group), strict=True)
            logits = self.model(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)))[..., :k].float()
            for i, m in enumerate(group):
                total += unshift_logits(logits[i], m.class_shift)
        mean = total / len(self.members) / self.temperature
        return torch.log_softmax(mean, dim=-1).numpy()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``[n, n_classes]`` (columns in the order of ``classes_``)."""
        return np.exp(self.predict_logits(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted labels (values of ``classes_``)."""
        logits = self.predict_logits(X)
        return self.classes_[np.argmax(logits, axis=1)]

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy on ``X, y``."""
        return float(np.mean(self.predict(X) == np.asarray(y)))
