"""Streaming metrics: hand-computed small cases, streaming in batches == scikit-learn / scipy / seqeval on the
full arrays, and the confusion-matrix PNG."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from seqeval.metrics import f1_score as seq_f1
from seqeval.metrics import precision_score as seq_precision
from seqeval.metrics import recall_score as seq_recall
from seqeval.scheme import IOBES
from sklearn.metrics import f1_score, precision_recall_fscore_support

from lmforge.metrics import ClassificationMetrics, EntityMetrics, MultiLabelMetrics, RegressionMetrics


def batches(n: int, sizes=(3, 5, 1, 7)):
    """Slices that cover range(n) in batches of varying size."""
    i, k = 0, 0
    while i < n:
        j = min(n, i + sizes[k % len(sizes)])
        yield slice(i, j)
        i, k = j, k + 1


# ------------------------------------------------------------------------------------------------ classification


def test_classification_hand_computed():
    m = ClassificationMetrics(["neg", "pos"])
    m.update(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]))
    m.update(np.array([0]), [1])
    r = m.result()
    assert m.n == 4
    # gold: 1 0 0 1, pred: 1 1 0 0 -> TP(pos)=1 FP(pos)=1 FN(pos)=1; TP(neg)=1 FP(neg)=1 FN(neg)=1
    assert r["accuracy"] == 0.5
    assert r["per_class"] == {"neg": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
                              "pos": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}}
    assert r["macro_f1"] == r["micro_f1"] == r["weighted_f1"] == 0.5
    assert r["confusion"] == [[1, 1], [1, 1]]
    assert "neg" in r["report"] and "pos" in r["report"] and "0.5000" in r["report"]


def test_classification_unpredicted_class():
    m = ClassificationMetrics(["a", "b", "c"])
    m.update([0, 0, 0, 0], [0, 0, 1, 2])
    r = m.result()
    assert r["accuracy"] == 0.5
    assert r["per_class"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 2}
    assert r["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert r["confusion"] == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]


def test_classification_streaming_equals_sklearn():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 4, 101), rng.integers(0, 4, 101)
    pred[:50] = gold[:50]
    m = ClassificationMetrics(["w", "x", "y", "z"])
    for s in batches(len(gold)):
        m.update(torch.from_numpy(pred[s]), torch.from_numpy(gold[s]))
    r = m.result()
    assert m.n == 101
    assert r["accuracy"] == pytest.approx(float((pred == gold).mean()))
    for avg in ("macro", "micro", "weighted"):
        p, rc, f, _ = precision_recall_fscore_support(gold, pred, average=avg, zero_division=0)
        assert (r[f"{avg}_precision"], r[f"{avg}_recall"], r[f"{avg}_f1"]) == pytest.approx((p, rc, f))
    assert r["micro_f1"] == pytest.approx(r["accuracy"])


def test_confusion_png(tmp_path):
    m = ClassificationMetrics(["negative", "positive", "neutral"])
    m.update([0, 1, 2, 1], [0, 1, 1, 2])
    out = m.confusion_png(tmp_path / "confusion.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []  # the figure was closed


def test_empty_metrics():
    assert math.isnan(ClassificationMetrics(["a", "b"]).result()["accuracy"])
    assert math.isnan(MultiLabelMetrics(["a"]).result()["micro_f1"])
    assert math.isnan(RegressionMetrics().result()["pearson"])
    assert math.isnan(EntityMetrics().result()["entity_f1"])


# ------------------------------------------------------------------------------------------------ multilabel


def test_multilabel_hand_computed():
    m = MultiLabelMetrics(["a", "b", "c"])
    m.update(torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool), torch.tensor([[1, 0, 0], [0, 1, 1]]))
    r = m.result()
    # a: TP1 FP1; b: TP1; c: FN1 -> micro P = 2/3, R = 2/3; subset accuracy 1/2
    assert m.n == 2
    assert r["micro_precision"] == pytest.approx(2 / 3) and r["micro_recall"] == pytest.approx(2 / 3)
    assert r["micro_f1"] == pytest.approx(2 / 3)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["subset_accuracy"] == 0.5
    assert r["hamming_loss"] == pytest.approx(2 / 6)
    assert r["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert "a" in r["report"]


def test_multilabel_streaming_equals_sklearn():
    rng = np.random.default_rng(1)
    gold, pred = rng.random((57, 5)) < 0.3, rng.random((57, 5)) < 0.3
    m = MultiLabelMetrics(list("vwxyz"))
    for s in batches(57):
        m.update(pred[s], gold[s])
    r = m.result()
    assert r["micro_f1"] == pytest.approx(f1_score(gold, pred, average="micro", zero_division=0))
    assert r["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    assert r["subset_accuracy"] == pytest.approx(float((gold == pred).all(1).mean()))


# ------------------------------------------------------------------------------------------------ regression


def test_regression_hand_computed():
    m = RegressionMetrics()
    m.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))
    m.update([4.0], [3.0])
    r = m.result()
    # errors 0, -1, 1 -> mse 2/3, mae 2/3
    assert r["mse"] == pytest.approx(2 / 3) and r["mae"] == pytest.approx(2 / 3)
    assert r["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert r["pearson"] == pytest.approx(stats.pearsonr([1, 2, 4], [1, 3, 3])[0])
    assert r["spearman"] == pytest.approx(stats.spearmanr([1, 2, 4], [1, 3, 3])[0])


def test_regression_streaming_and_constant():
    rng = np.random.default_rng(2)
    gold = rng.normal(size=80)
    pred = gold + rng.normal(scale=0.5, size=80)
    m = RegressionMetrics()
    for s in batches(80):
        m.update(pred[s], gold[s])
    r = m.result()
    assert r["mse"] == pytest.approx(float(((pred - gold) ** 2).mean()))
    assert r["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0])
    assert r["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0])
    c = RegressionMetrics()
    c.update([0.5, 0.5, 0.5], [1.0, 2.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = c.result()
    assert math.isnan(rc["pearson"]) and math.isnan(rc["spearman"]) and rc["mse"] == pytest.approx(
        (0.25 + 2.25 + 6.25) / 3)


# ------------------------------------------------------------------------------------------------ entities


def test_entities_bio_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    m = EntityMetrics("BIO")
    m.update(pred[:1], gold[:1])
    m.update(pred[1:], gold[1:])
    r = m.result()
    # gold entities PER, LOC, ORG; predicted PER, ORG(wrong span type), ORG -> 2 of 3 right either way
    assert m.n == 2
    assert r["entity_precision"] == pytest.approx(2 / 3) and r["entity_recall"] == pytest.approx(2 / 3)
    assert r["entity_f1"] == pytest.approx(2 / 3)
    assert r["token_accuracy"] == pytest.approx(5 / 6)
    assert r["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["per_type"]["PER"]["f1"] == 1.0
    assert "PER" in r["report"]


def test_entities_bio_lenient_vs_iobes_strict():
    # conlleval-style BIO counts an entity that starts with I-; strict IOBES does not accept broken spans
    m = EntityMetrics("BIO")
    m.update([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])
    assert m.result()["entity_f1"] == 1.0
    gold = [["B-PER", "E-PER", "O", "S-LOC"], ["S-ORG", "O", "B-MISC", "I-MISC", "E-MISC"]]
    pred = [["B-PER", "I-PER", "O", "S-LOC"], ["S-ORG", "O", "B-MISC", "I-MISC", "E-MISC"]]
    m = EntityMetrics("IOBES")
    m.update(pred, gold)
    r = m.result()
    assert r["entity_recall"] == pytest.approx(3 / 4) and r["entity_precision"] == 1.0
    assert r["entity_f1"] == pytest.approx(seq_f1(gold, pred, mode="strict", scheme=IOBES))


def test_entities_streaming_equals_seqeval():
    rng = random.Random(3)
    types = ["PER", "LOC", "ORG"]

    def sentence():
        tags = []
        while len(tags) < 12:
            if rng.random() < 0.6:
                tags.append("O")
            else:
                t = rng.choice(types)
                tags += [f"B-{t}"] + [f"I-{t}"] * rng.randint(0, 2)
        return tags

    gold = [sentence() for _ in range(40)]
    pred = [[t if rng.random() < 0.85 else rng.choice(["O", "B-PER", "I-LOC"]) for t in s] for s in gold]
    m = EntityMetrics("BIO")
    for s in batches(40):
        m.update(pred[s], gold[s])
    r = m.result()
    assert r["entity_f1"] == pytest.approx(seq_f1(gold, pred))
    assert r["entity_precision"] == pytest.approx(seq_precision(gold, pred))
    assert r["entity_recall"] == pytest.approx(seq_recall(gold, pred))


def test_entities_without_any_entity():
    m = EntityMetrics()
    m.update([["O", "O"]], [["O", "O"]])
    r = m.result()
    assert r["entity_f1"] == 0.0 and r["token_accuracy"] == 1.0 and r["per_type"] == {}
    with pytest.raises(ValueError):
        m.update([["O"]], [["O", "O"]])
