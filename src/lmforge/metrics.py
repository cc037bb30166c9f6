"""Streaming evaluation metrics for fine-tuning tasks, and BLEU/chrF for translation.

Each metric object is updated batch by batch with predictions (class indices, booleans, numbers or tag
strings, never logits) and the gold values, keeps them, and computes its numbers at `result()` with
scikit-learn, scipy or seqeval, so streaming in batches gives exactly what one call on the full arrays
gives. `n` counts the examples (sentences for EntityMetrics) seen so far.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

AVERAGES = ("macro", "micro", "weighted")


def _array(x, dtype=None) -> np.ndarray:
    """A numpy copy of a tensor, array or list."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)



class _Collected:
    """Predictions and gold values gathered batch by batch (predictions, never logits)."""

    def __init__(self):
        self._pred: list[np.ndarray] = []
        self._gold: list[np.ndarray] = []
        self.n = 0

    def _rows(self, x) -> np.ndarray:
        return _array(x, np.int64).reshape(-1)

    def update(self, pred, gold) -> None:
        p, g = self._rows(pred), self._rows(gold)
        if p.shape != g.shape:
            raise ValueError(f"predictions of shape {p.shape} but gold values of shape {g.shape}")
        self._pred.append(p)
        self._gold.append(g)
        self.n += len(p)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(pred, gold) of everything seen so far."""
        empty = self._rows([])
        return (np.concatenate(self._pred) if self._pred else empty,
                np.concatenate(self._gold) if self._gold else empty)


class ClassificationMetrics(_Collected):
    """Single-label classification over `labels` (pred and gold are indices into it)."""

    def __init__(self, labels: list[str]):
        super().__init__()
        self.labels = list(labels)

    def result(self) -> dict:
        """accuracy; macro_/micro_/weighted_ precision, recall, f1; report (text); per_class; confusion."""
        from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix,
                                     precision_recall_fscore_support)
        pred, gold = self.arrays()
        ids = list(range(len(self.labels)))
        out: dict = {}
        if self.n == 0:
            out["accuracy"] = math.nan
            for avg in AVERAGES:
                out.update({f"{avg}_precision": math.nan, f"{avg}_recall": math.nan, f"{avg}_f1": math.nan})
            out.update(report="", per_class={}, confusion=[[0] * len(ids) for _ in ids])
            return out
        out["accuracy"] = float(accuracy_score(gold, pred))
        for avg in AVERAGES:
            p, r, f, _ = precision_recall_fscore_support(gold, pred, labels=ids, average=avg, zero_division=0)
            out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
        p, r, f, s = precision_recall_fscore_support(gold, pred, labels=ids, average=None, zero_division=0)
        out["report"] = classification_report(gold, pred, labels=ids, target_names=self.labels, digits=4,
                                              zero_division=0)
        out["per_class"] = {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                    "support": int(s[i])} for i, label in enumerate(self.labels)}
        out["confusion"] = confusion_matrix(gold, pred, labels=ids).tolist()
        return out

    def confusion_png(self, path: str | Path) -> Path:
        """The confusion matrix (rows: gold, columns: predicted) drawn with the label names on the axes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

        from lmforge.io import atomic_write  # here, as matplotlib: lmforge.io imports torch

        pred, gold = self.arrays()
        ids = list(range(len(self.labels)))
        cm = confusion_matrix(gold, pred, labels=ids) if self.n else np.zeros((len(ids), len(ids)), np.int64)
        size = max(4.0, 0.5 * len(ids) + 2.5)
        fig, ax = plt.subplots(figsize=(size, size))
        try:
            ConfusionMatrixDisplay(cm, display_labels=self.labels).plot(
                ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if len(ids) > 4 else "horizontal")
            ax.set_title(f"confusion matrix ({self.n} examples)")
            fig.tight_layout()
            path = Path(path)
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return path


class MultiLabelMetrics(_Collected):
    """Multi-label classification: pred and gold are [N, L] booleans (label j applies to example i)."""

    def __init__(self, labels: list[str]):
        super().__init__()
        self.labels = list(labels)

    def _rows(self, x) -> np.ndarray:
        return _array(x).astype(bool).reshape(-1, len(self.labels))

    def result(self) -> dict:
        """micro_/macro_ precision, recall, f1; subset_accuracy (exact match); hamming_loss; report; per_label."""
        from sklearn.metrics import accuracy_score, classification_report, hamming_loss, \
            precision_recall_fscore_support
        pred, gold = self.arrays()
        out: dict = {}
        if self.n == 0:
            for avg in ("micro", "macro"):
                out.update({f"{avg}_precision": math.nan, f"{avg}_recall": math.nan, f"{avg}_f1": math.nan})
            out.update(subset_accuracy=math.nan, hamming_loss=math.nan, report="", per_label={})
            return out
        for avg in ("micro", "macro"):
            p, r, f, _ = precision_recall_fscore_support(gold, pred, average=avg, zero_division=0)
            out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
        out["subset_accuracy"] = float(accuracy_score(gold, pred))
        out["hamming_loss"] = float(hamming_loss(gold, pred))
        out["report"] = classification_report(gold, pred, target_names=self.labels, digits=4, zero_division=0)
        p, r, f, s = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
        out["per_label"] = {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                    "support": int(s[i])} for i, label in enumerate(self.labels)}
        return out


class RegressionMetrics(_Collected):
    """Regression: pred and gold are [N] numbers. pearson and spearman are nan when either side is constant
    (or fewer than two examples were seen), without a warning."""

    def _rows(self, x) -> np.ndarray:
        return _array(x, np.float64).reshape(-1)

    def result(self) -> dict:
        """mse, mae, rmse, pearson, spearman."""
        from scipy import stats
        from sklearn.metrics import mean_absolute_error, mean_squared_error
        pred, gold = self.arrays()
        if self.n == 0:
            return {"mse": math.nan, "mae": math.nan, "rmse": math.nan, "pearson": math.nan, "spearman": math.nan}
        mse = float(mean_squared_error(gold, pred))
        out = {"mse": mse, "mae": float(mean_absolute_error(gold, pred)), "rmse": math.sqrt(mse)}
        varied = self.n >= 2 and np.ptp(pred) > 0 and np.ptp(gold) > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["pearson"] = float(stats.pearsonr(pred, gold)[0]) if varied else math.nan
            out["spearman"] = float(stats.spearmanr(pred, gold)[0]) if varied else math.nan
        return out


class EntityMetrics:
    """Named entities (spans) from word-level tag strings, with seqeval: BIO is scored conlleval-style,
    IOBES in seqeval's strict mode with its IOBES scheme. `n` counts sentences."""

    def __init__(self, scheme: str = "BIO"):
        if scheme not in ("BIO", "IOBES"):
            raise ValueError(f"scheme {scheme!r}; expected BIO or IOBES")
        self.scheme = scheme
        self._pred: list[list[str]] = []
        self._gold: list[list[str]] = []
        self.n = 0

    def update(self, pred_tags: list[list[str]], gold_tags: list[list[str]]) -> None:
        if len(pred_tags) != len(gold_tags):
            raise ValueError(f"{len(pred_tags)} predicted sentences but {len(gold_tags)} gold sentences")
        for i, (p, g) in enumerate(zip(pred_tags, gold_tags)):
            if len(p) != len(g):
                raise ValueError(f"sentence {self.n + i}: {len(p)} predicted tags but {len(g)} gold tags")
            self._pred.append(list(p))
            self._gold.append(list(g))
        self.n += len(gold_tags)

    def _kwargs(self) -> dict:
        if self.scheme == "IOBES":
            from seqeval.scheme import IOBES
            return {"mode": "strict", "scheme": IOBES}
        return {}

    def result(self) -> dict:
        """entity_precision, entity_recall, entity_f1 (micro over entities), token_accuracy, report, per_type."""
        from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
        if self.n == 0 or not any(self._gold):
            out = {"entity_precision": math.nan, "entity_recall": math.nan, "entity_f1": math.nan,
                   "token_accuracy": math.nan, "report": "", "per_type": {}}
            if self.n:
                out["token_accuracy"] = float(accuracy_score(self._gold, self._pred))
            return out
        kw = self._kwargs()
        gold, pred = self._gold, self._pred
        out = {
            "entity_precision": float(precision_score(gold, pred, zero_division=0, **kw)),
            "entity_recall": float(recall_score(gold, pred, zero_division=0, **kw)),
            "entity_f1": float(f1_score(gold, pred, zero_division=0, **kw)),
            "token_accuracy": float(accuracy_score(gold, pred)),
        }
        try:
            out["report"] = classification_report(gold, pred, digits=4, zero_division=0, **kw)
            table = classification_report(gold, pred, output_dict=True, zero_division=0, **kw)
        except ValueError:  # seqeval cannot build a report when neither side has any entity
            out["report"], table = "no entities in the gold or the predicted tags\n", {}
        out["per_type"] = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                               "f1": float(v["f1-score"]), "support": int(v["support"])}
                           for k, v in table.items() if not k.endswith(" avg")}
        return out


def translation_scores(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> tuple[dict, dict]:
    """Corpus BLEU (with sacrebleu's `tokenize`) and chrF of detokenised output against one reference
    each -> ({"bleu", "chrf", "bp"}, {"bleu": signature, "chrf": signature}); the signatures say how the
    scores were computed, so they can be compared with published ones."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    b, c = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses, [references])
    return ({"bleu": b.score, "chrf": c.score, "bp": b.bp},
            {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())})
