"""In-context preprocessing, ensembling and the classifier wrapper (tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpqat.errors import ConfigError, DatasetError
from mpqat.tabpfn.incontext import (
    InContextClassifier,
    Member,
    OrdinalFromOneHot,
    ensemble_members,
    member_inputs,
    pad_features,
    preprocess,
    squash_outliers,
    stratified_context,
    unshift_logits,
)
from mpqat.tabpfn.model import TabPFN, TabPFNConfig


@pytest.mark.parametrize("transform", ["none", "power"])
def test_preprocess_uses_context_statistics_only(toy_data, transform):
    X, _ = toy_data
    ctx, q1 = X[:80], X[80:100]
    q2 = X[100:] * 50.0
    a = preprocess(ctx, q1, transform)
    b = preprocess(ctx, q2, transform)
    assert a.shape == (100, 5)  # the constant column is dropped
    assert np.array_equal(a[:80], b[:80])  # the queries do not change the context rows
    assert np.all(np.isfinite(a)) and a.dtype == np.float32
    # rescaled to the number of used features: the context's std is about 100/5 = 20
    assert 10 < float(a[:80].std(0).mean()) < 25


def test_preprocess_rejects_unknown_transform(toy_data):
    with pytest.raises(ConfigError, match="transform"):
        preprocess(toy_data[0][:10], toy_data[0][10:20], "quantile")


def test_squash_outliers_is_soft_and_monotone():
    ctx = np.concatenate([np.random.default_rng(0).normal(size=(200, 1)), [[50.0]]])
    full = np.concatenate([ctx, [[100.0], [-100.0], [0.5]]])
    out = squash_outliers(full, len(ctx))
    assert out[-1, 0] == 0.5  # inside the bounds: unchanged
    assert 4 < out[-3, 0] < 12 and -12 < out[-2, 0] < -4  # squashed, log-like
    order = np.argsort(full[:, 0])
    assert np.all(np.diff(out[order, 0]) >= 0)


def test_ensemble_members_mix_transforms_and_are_seeded():
    m = ensemble_members(n_classes=3, n_features=5, n_ensemble=4, seed=1)
    assert [x.transform for x in m] == ["none", "power", "none", "power"]
    assert m[0].class_shift == m[1].class_shift and m[0].feature_shift == m[1].feature_shift
    assert m == ensemble_members(3, 5, 4, seed=1)
    assert all(0 <= x.class_shift < 3 and 0 <= x.feature_shift < 5 for x in m)
    with pytest.raises(ConfigError):
        ensemble_members(2, 3, 0)


def test_member_inputs_and_unshift_are_inverse():
    prepped = np.arange(12, dtype=np.float32).reshape(2, 6)
    member = Member(class_shift=2, feature_shift=1, transform="none")
    x, y = member_inputs(prepped, np.array([0, 1, 2]), member, n_classes=3, n_features=8)
    assert x.shape == (2, 8) and np.array_equal(x[0, :6], [1, 2, 3, 4, 5, 0]) and np.all(x[:, 6:] == 0)
    assert y.tolist() == [2.0, 0.0, 1.0]
    # a model that puts its logit on the shifted label: unshifting gives the original class
    logits = torch.nn.functional.one_hot(torch.tensor(y).long(), 3).float()
    assert unshift_logits(logits, 2).argmax(-1).tolist() == [0, 1, 2]
    with pytest.raises(DatasetError):
        pad_features(np.zeros((1, 9)), 8)


def test_stratified_context_keeps_proportions():
    y = np.array([0] * 900 + [1] * 300 + [2] * 3)
    idx = stratified_context(y, 100, seed=0)
    counts = np.bincount(y[idx])
    assert len(idx) == 100 and len(set(idx)) == 100
    assert counts[2] >= 1 and abs(counts[0] - 75) <= 2
    assert np.array_equal(stratified_context(y[:50], 100), np.arange(50))


def test_ordinal_from_one_hot():
    enc = OrdinalFromOneHot(["x", "c=a", "c=b", "d=u", "d=v", "z"])
    X = np.array([[0.1, 1, 0, 0, 1, 7], [0.2, 0, 1, 1, 0, 8], [0.3, 0, 0, 1, 0, 9]], dtype=np.float32)
    assert enc.feature_names == ["x", "c", "d", "z"]
    assert np.allclose(enc.transform(X), [[0.1, 0, 1, 7], [0.2, 1, 0, 8], [0.3, -1, 0, 9]])
    with pytest.raises(DatasetError):
        enc.transform(X[:, :3])


def test_classifier_predicts_probabilities(toy_data):
    torch.manual_seed(0)
    X, y = toy_data
    model = TabPFN(TabPFNConfig.tiny(n_features=8))
    clf = InContextClassifier(model, n_ensemble=3, max_context=50).fit(X[:100], y[:100] + 5)
    assert len(clf.X_ctx) == 50 and set(clf.classes_) == {5, 6}
    proba = clf.predict_proba(X[100:])
    assert proba.shape == (20, 2) and np.allclose(proba.sum(1), 1.0, atol=1e-5)
    assert set(clf.predict(X[100:])) <= {5, 6}
    assert 0.0 <= clf.score(X[100:], y[100:] + 5) <= 1.0
    small = InContextClassifier(model, n_ensemble=3, max_context=50, query_batch=7).fit(X[:100], y[:100] + 5)
    assert np.allclose(small.predict_proba(X[100:]), proba, atol=1e-5)  # query chunks are independent


def test_classifier_rejects_what_v1_cannot_do(toy_data):
    X, y = toy_data
    model = TabPFN(TabPFNConfig.tiny(n_features=4))
    with pytest.raises(DatasetError, match="at most 4"):
        InContextClassifier(model).fit(X, y)
    with pytest.raises(DatasetError, match="at most 10"):
        InContextClassifier(TabPFN(TabPFNConfig.tiny(n_features=8))).fit(X[:, :4], np.arange(120) % 11)
    with pytest.raises(ConfigError, match="1000"):
        InContextClassifier(model, max_context=2000)
    with pytest.raises(ConfigError, match="fit"):
        InContextClassifier(model).predict(X[:, :4])
