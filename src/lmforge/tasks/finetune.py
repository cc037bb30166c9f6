"""What every fine-tuning task shares: labelled files in, a pretrained body loaded from a run or a
Hugging Face folder, epochs of length-grouped, dynamically padded batches, the whole dev set evaluated
with the task's metrics, and a report (JSON + text) on the best weights.

setup() reads the files and the pretrained body; resolve() writes what they decide into the config (the
label set, the body's shape and direction, the pooling, the steps of the epochs). The model is the
registry entry's model kind (model/build.py). A subclass fills the hooks FinetuneTask declares: its labels
(`label_map`), how examples become token ids (`encode_all`) and a batch's gold tensors (`targets`), and
its metrics (`new_metrics`, `metric_names`, `default_metric`, `result_metrics`). A batch goes through the model once (`outputs`); the summed loss
(`loss_from`; training's `loss` is loss_from(outputs(...))), the metric updates (`update_metrics`) and the
records of `lmforge predict` (`predictions`) are all computed from those outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.data.batches import ExampleBatches, pad_batch
from lmforge.data.labelled import Example, LabelMap, read_examples, split_dev, tag_scheme
from lmforge.data.tokenizer import eos_id, save_tokenizer
from lmforge.errors import UserError
from lmforge.hf.load import load_hf
from lmforge.model.build import build_model
from lmforge.peft import apply_peft
from lmforge.io import atomic_write
from lmforge.runs import LABELS_FILE, hf_side_files, load_as_base, load_matching, write_hf_side_files
from lmforge.tasks import registry
from lmforge.tasks.base import Task

DEV_CONFUSION = "confusion.png"  # the dev set's confusion matrix (report.html shows it under the dev report)
PADDING_SHARE = 0.2  # an inference batch ends before padding passes this share of its tokens
CLS_NAMES, SEP_NAMES, PAD_NAMES, MASK_NAMES = ("[CLS]", "<s>"), ("[SEP]", "</s>"), ("[PAD]", "<pad>"), ("[MASK]", "<mask>")


def _first_id(tok: Tokenizer, names) -> int | None:
    return next((i for n in names if (i := tok.token_to_id(n)) is not None), None)


@dataclasses.dataclass
class Encoded:
    ids: list[int]
    segments: list[int] | None = None
    target: list[int] | None = None  # per-token targets (tag, sft)
    word_starts: list[int] | None = None  # tag: each word's first token


@dataclasses.dataclass
class Answers:
    """One example's rows, one per answer (dpo, reward): a pair's chosen then its rejected answer, or the one
    answer a reward model scores."""

    rows: list[Encoded]

    @property
    def ids(self) -> list[int]:
        """The longest row's ids: what batching by length and the padding share go by (len(ids))."""
        return max((r.ids for r in self.rows), key=len)


def groups_by_length(fc) -> bool:
    """Whether training batches examples of similar length together: finetune.group_by_length, but not with
    finetune.pack, whose rows have no padding for grouping to save, and where batches of alike examples only
    learn worse (a LoRA SFT of SmolLM2 ended 0.014-0.018 higher in dev loss over 12 steps, sft_vs_hf.py)."""
    return fc.group_by_length and not fc.pack


class FinetuneTask(Task):
    final_report = "dev_report.json"
    default_metric = ""  # the dev metric of finetune.metric = auto: one of metric_names()
    needs_decoder = False  # the task trains a causal LM's own head (sft): an encoder to start from is a user error

    # -- set-up -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Read the labelled files and the pretrained body, resolve() the config, encode the examples."""
        cfg, fc = self.cfg, self.cfg.finetune
        if not fc.init_from:
            raise UserError("config: finetune.init_from: expected the pretrained model to start from (a run "
                            "directory, a checkpoint or a Hugging Face folder), e.g. --finetune.init_from runs/RUN, "
                            "or a recipe: --config configs/finetune-sst2.yaml")
        if not fc.train:
            raise UserError("config: finetune.train: expected the labelled training file (--finetune.train FILE)")
        train = read_examples(fc.train, self.name, fc)
        if fc.dev:
            dev = read_examples(fc.dev, self.name, fc)
        else:
            train, dev = split_dev(train, fc.dev_fraction, cfg.train.seed)
        self.train_examples, self.dev_examples = train, dev
        self.labels = self.label_map(train, dev)
        self.start, tok = self._pretrained()
        self.resolve()
        self.use_tokenizer(tok)
        self.train_rows = self.encode_all(train, self.fc_path("train"))
        self.dev_rows = self.encode_all(dev, fc.dev or fc.train)
        if fc.metric != "auto" and fc.metric not in self.metric_names():
            raise UserError(f"config: finetune.metric = {fc.metric!r}: the {self.name} evaluation reports "
                            f"{', '.join(self.metric_names())}")

    def fc_path(self, split: str) -> str:
        return getattr(self.cfg.finetune, split) or self.cfg.finetune.train

    def label_map(self, train: list[Example], dev: list[Example]) -> LabelMap | None:
        """The label set: the training file's labels sorted, or finetune.labels in its order; None for a
        task without labels."""
        fc = self.cfg.finetune
        labels = LabelMap.build(train, self.name, fc.labels, path=fc.train)
        for e in dev:  # an unknown dev label stops the run now, not at the first evaluation
            for label in (e.label if isinstance(e.label, list) else [e.label]):
                labels.index(label, e, fc.dev or fc.train)
        return labels

    def resolve(self):
        """The label set (recorded in config.yaml: the run rebuilds its head from it), the pretrained
        body's shape, direction and pooling as the model was built on it (self.built), and
        finetune.epochs -> train.max_steps, finetune.evals_per_epoch -> eval.every (the loop then fits the
        schedule's warmup and horizon to that max_steps: optim.start_schedule)."""
        cfg, fc, tc, built = self.cfg, self.cfg.finetune, self.cfg.train, self.built
        cfg.model = built.model
        fc.labels, fc.body, fc.pooling = built.finetune.labels, built.finetune.body, built.finetune.pooling
        world = self.shard[1]
        steps_per_epoch = max(1, math.ceil(len(self.train_examples) / (tc.batch_size * world)) // tc.grad_accum)
        if fc.epochs:
            tc.max_steps = max(1, math.ceil(fc.epochs * steps_per_epoch))
        if fc.evals_per_epoch:
            cfg.eval.every = max(1, steps_per_epoch // fc.evals_per_epoch)
        return cfg

    def _pretrained(self) -> tuple[torch.nn.Module, Tokenizer]:
        """The plain task model with the pretrained body's weights (the head fresh), and the tokenizer;
        self.built is the config it was built from."""
        cfg, fc = self.cfg, self.cfg.finetune
        path = Path(fc.init_from)
        if path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file():
            imported = load_hf(path, build=self._adopt)
            for note in imported.notes:
                print(f"lmforge: note: {note}")
            model, tok, fresh = imported.model, imported.tokenizer, imported.fresh
        else:
            base, tok, base_cfg = load_as_base(path)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                model = self._adopt(base_cfg)
            fresh = load_matching(model, base.state_dict())
            if fresh:
                print(f"lmforge: note: not in {path}, so trained from a fresh start: {', '.join(fresh)}")
        if getattr(model, "pooling", None) == "pooler" and fc.pooling == "auto" and "pooler" in fresh:
            # an encoder without a trained pooler: pool its first token instead
            model.pooling, model.pooler, self.built.finetune.pooling = "cls", None, "cls"
        return model.train(), tok

    def _adopt(self, base_cfg) -> torch.nn.Module:
        """The task model on the pretrained body that base_cfg describes (load_run's and load_hf's build):
        the body's shape and direction, pooling auto chosen for it (pooler for an encoder, until its
        checkpoint turns out to have none), the label set found. The config it is built from, the run's
        with those, is kept as self.built for resolve()."""
        fc = self.cfg.finetune
        body = registry.spec(base_cfg.task).body
        causal = (base_cfg.finetune.body if body == "pretrained" else body) == "decoder"
        if self.needs_decoder and not causal:
            raise UserError(f"config: task {self.name} needs a causal language model; finetune.init_from = "
                            f"{fc.init_from} holds a {base_cfg.task} encoder")
        # the body's shape is the checkpoint's; only its dropout may differ for this run
        shape = dataclasses.replace(base_cfg.model)
        if fc.dropout is not None:
            shape.dropout = fc.dropout
        pooling = fc.pooling if fc.pooling != "auto" else "last" if causal else "pooler"
        labels = list(self.labels.labels) if self.labels is not None else fc.labels
        self.built = dataclasses.replace(self.cfg, model=shape, finetune=dataclasses.replace(
            fc, body="decoder" if causal else "encoder", pooling=pooling, labels=labels))
        return build_model(self.built)

    def use_tokenizer(self, tok: Tokenizer) -> None:
        """Special ids from the tokenizer; its own truncation and padding settings are turned off (an
        HF tokenizer.json may carry them), since examples are cut and padded here."""
        tok.no_truncation()
        tok.no_padding()
        self.tokenizer = tok
        self.cls_id, self.sep_id = _first_id(tok, CLS_NAMES), _first_id(tok, SEP_NAMES)
        self.eos_id = eos_id(tok)
        pad = _first_id(tok, PAD_NAMES)
        self.pad_id = pad if pad is not None else (self.eos_id or 0)
        mask = _first_id(tok, MASK_NAMES)
        self.mask_token = tok.id_to_token(mask) if mask is not None else "[UNK]"
        self.max_length = min(self.cfg.finetune.max_length, self.cfg.model.max_seq_len)
        self.encoder = self.cfg.finetune.body != "decoder"

    def prepare_inference(self, tok: Tokenizer, run_dir: Path | None = None) -> None:
        """For a trained run (evaluate, predict, serve; `run_dir` its folder): the tokenizer and the label
        map from its config."""
        self.use_tokenizer(tok)
        labels = self.cfg.finetune.labels
        tags = registry.spec(self.name).label == "tags"
        self.labels = LabelMap(labels, self.name, tag_scheme(labels) if tags else None) if labels else None

    # -- model ---------------------------------------------------------------------------------------

    def build_model(self, pretrained: bool = False) -> torch.nn.Module:
        """The task model with its PEFT modules; pretrained: start from init_from's weights (setup loaded
        them), else fresh weights that a run's saved state will fill."""
        model = self.start if pretrained else build_model(self.cfg)
        apply_peft(model, self.cfg.peft)
        return model

    # -- batches -------------------------------------------------------------------------------------

    def encode_all(self, examples: list[Example], path: str) -> list[Encoded]:
        """Each example's token ids (and segments, per-token targets); `path` names the file in errors."""
        raise NotImplementedError

    def augmented(self, examples: list[Example], rng: random.Random) -> list[Example]:
        """Training examples with robust.augment applied (each with probability augment_prob)."""
        from lmforge.data.augment import augment

        rc, out = self.cfg.robust, []
        for e in examples:
            if rng.random() >= rc.augment_prob:
                out.append(e)
                continue
            if isinstance(e.text, list):  # tagged words: tags stay aligned
                words, tags = augment(e.text, rng, rc.augment, rc.augment_rate, self.mask_token, e.label)
                out.append(dataclasses.replace(e, text=words, label=tags))
            else:
                words, _ = augment(e.text.split(), rng, rc.augment, rc.augment_rate, self.mask_token)
                out.append(dataclasses.replace(e, text=" ".join(words)))
        return out

    def collate(self, rows: list[Encoded], examples: list[Example]) -> dict[str, torch.Tensor]:
        ids = pad_batch([r.ids for r in rows], self.pad_id, fill=-1)
        batch = {"input": ids.clamp(min=0) + (ids < 0) * self.pad_id, "pad_mask": ids >= 0}
        if self.cfg.model.type_vocab_size and rows[0].segments is not None:
            batch["segments"] = pad_batch([r.segments for r in rows], 0)
        batch.update(self.targets(rows, examples))
        return batch

    def targets(self, rows: list[Encoded], examples: list[Example]) -> dict[str, torch.Tensor]:
        """The batch's gold tensors (on the CPU), beside its input, e.g. {"label": ...} or {"target": ...}."""
        raise NotImplementedError

    def train_batches(self, seed: int) -> ExampleBatches:
        def make(indices, epoch: int, index: int):
            examples = [self.train_examples[i] for i in indices]
            if self.cfg.robust.augment:
                examples = self.augmented(examples, random.Random(f"{seed}-{epoch}-{index}"))
                return self.collate(self.encode_all(examples, self.fc_path("train")), examples)
            return self.collate([self.train_rows[i] for i in indices], examples)

        return ExampleBatches([len(r.ids) for r in self.train_rows], self.cfg.train.batch_size, seed, make, self.shard,
                              groups_by_length(self.cfg.finetune))

    def batches_in_order(self, rows: list[Encoded], examples: list[Example]) -> Iterator[tuple[np.ndarray, dict]]:
        """(example indices, batch) over all rows, longest first; eval, predict and the server. A batch holds
        at most eval.batch_size rows and ends early where padding would pass PADDING_SHARE of its tokens: a
        few texts of mixed lengths (one server batch) would otherwise all be padded to the longest, which on
        a CPU cost more than the batching saved."""
        def batch(chosen: list[int]) -> tuple[np.ndarray, dict]:
            return np.array(chosen), self.collate([rows[k] for k in chosen], [examples[k] for k in chosen])

        size, chosen, real = self.cfg.eval.batch_size, [], 0
        for j in np.argsort([-len(r.ids) for r in rows], kind="stable"):
            n = len(rows[j].ids)
            longest = len(rows[chosen[0]].ids) if chosen else n  # rows come longest first
            if chosen and (len(chosen) == size or real + n < (1 - PADDING_SHARE) * (len(chosen) + 1) * longest):
                yield batch(chosen)
                chosen, real = [], 0
            chosen.append(j)
            real += n
        if chosen:
            yield batch(chosen)

    def flops_per_token(self, model) -> float:
        return model.flops_per_token(context=float(np.mean([len(r.ids) for r in self.train_rows])))

    def eval_batches(self):
        return (batch for _, batch in self.batches_in_order(self.dev_rows, self.dev_examples))

    # -- the forward pass and what is computed from it -----------------------------------------------

    def outputs(self, model, batch: dict):
        """The batch's one pass through the model: everything below is computed from what it returns.
        By default the model's output (logits) in fp32."""
        return model(batch["input"], segments=batch.get("segments"), pad_mask=batch["pad_mask"]).float()

    def loss_from(self, outputs, batch: dict) -> torch.Tensor:
        """The loss summed over the batch's targets (see count()), from its outputs."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        return self.loss_from(self.outputs(model, batch), batch)

    def update_metrics(self, metrics, outputs, batch: dict, rows: list[Encoded], examples: list[Example]) -> None:
        """Add the batch's predictions, read from its outputs, and gold values to `metrics` (new_metrics())."""
        raise NotImplementedError

    def predictions(self, outputs, batch: dict, rows: list[Encoded], examples: list[Example]) -> list[dict]:
        """One JSON-ready record per example of the batch, from its outputs (`lmforge predict`, the server)."""
        raise NotImplementedError

    # -- evaluation ----------------------------------------------------------------------------------

    def metric_names(self) -> list[str]:
        """The dev metrics the evaluation reports, "loss" among them: the choices of finetune.metric."""
        raise NotImplementedError

    def selection(self) -> tuple[str, bool]:
        metric = self.cfg.finetune.metric
        if metric == "auto":
            metric = self.default_metric
        return metric, metric not in ("loss", "mse", "mae", "rmse")

    def new_metrics(self):
        """An empty metrics object: update_metrics() fills it, its result() gives the numbers (lmforge.metrics)."""
        raise NotImplementedError

    def measure(self, model, device, rows: list[Encoded], examples: list[Example]) -> tuple[dict, object]:
        """(scalar metrics with the mean loss, the metrics object) over all rows, one forward pass a batch."""
        metrics, loss_sum, n = self.new_metrics(), 0.0, 0
        with torch.no_grad():
            for chosen, batch in self.batches_in_order(rows, examples):
                batch = {k: v.to(device) for k, v in batch.items()}
                outputs = self.outputs(model, batch)
                loss_sum += float(self.loss_from(outputs, batch))
                n += self.count(batch)
                self.update_metrics(metrics, outputs, batch, [rows[j] for j in chosen], [examples[j] for j in chosen])
        scalars = {k: float(v) for k, v in metrics.result().items() if isinstance(v, (int, float, np.floating))}
        return {"loss": loss_sum / max(n, 1), **scalars}, metrics

    def evaluate(self, model, to_device) -> dict[str, float]:
        device = next(model.parameters()).device
        return self.measure(model, device, self.dev_rows, self.dev_examples)[0]

    def report(self, model, examples: list[Example], path: str, confusion: Path | None = None) -> tuple[dict, str]:
        """The full evaluation of `examples` (JSON-ready dict, text to print); with `confusion` also the
        confusion matrix drawn there, where the task has one."""
        device = next(model.parameters()).device
        rows = self.encode_all(examples, path)
        scalars, metrics = self.measure(model, device, rows, examples)
        full = {**metrics.result(), **scalars, "examples": len(examples)}
        text = full.get("report", "")
        if confusion is not None and hasattr(metrics, "confusion_png"):
            metrics.confusion_png(confusion)
        shown = {k: v for k, v in scalars.items() if k in self.result_metrics()}
        return full, text + "\n" + "  ".join(f"{k} {v:.4f}" for k, v in shown.items())

    def result_metrics(self) -> tuple[str, ...]:
        """The metrics of the `RESULT` line of `lmforge evaluate`."""
        raise NotImplementedError

    def save_artifacts(self, run_dir: Path) -> None:
        save_tokenizer(self.tokenizer, run_dir / "tokenizer.json")
        write_hf_side_files(run_dir, hf_side_files(self.cfg.finetune.init_from))  # chat template, end tokens
        if self.labels is not None:
            self.labels.save(run_dir / LABELS_FILE)

    def finish(self, model, run_dir: Path) -> str:
        full, text = self.report(model, self.dev_examples, self.fc_path("dev"), run_dir / DEV_CONFUSION if self.main else None)
        if self.main:
            report = json.dumps(full, indent=2, default=float) + "\n"
            atomic_write(run_dir / self.final_report, lambda tmp: tmp.write_text(report, encoding="utf-8"))
        return f"dev set ({len(self.dev_examples)} examples), best weights:\n{text}"

    # -- prediction ----------------------------------------------------------------------------------

    def predict(self, model, examples: list[Example], path: str) -> list[dict]:
        """One JSON-ready record per example, in input order."""
        device = next(model.parameters()).device
        rows = self.encode_all(examples, path)
        out: list[dict | None] = [None] * len(examples)
        with torch.no_grad():
            for chosen, batch in self.batches_in_order(rows, examples):
                batch = {k: v.to(device) for k, v in batch.items()}
                records = self.predictions(self.outputs(model, batch), batch, [rows[j] for j in chosen],
                                           [examples[j] for j in chosen])
                for j, record in zip(chosen, records):
                    out[j] = record
        return out
