"""Sequence to sequence: an encoder-decoder trained on parallel text (translation), evaluated with
sacrebleu's BLEU and chrF on greedy (during training) and beam-search (at the end) translations.

A pair becomes: the source ids + </s> for the encoder, <s> + target ids as the decoder's input, and the
target ids + </s> as what it predicts. The vocabulary is one BPE trained on both sides (joint BPE),
so the encoder and decoder share one embedding, tied to the output projection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.config import Config
from lmforge.data.batches import ExampleBatches, pad_batch
from lmforge.data.parallel import keep_by_length, read_parallel
from lmforge.data.tokenizer import (SEQ2SEQ_SPECIALS, load_tokenizer, save_tokenizer, seq2seq_special_ids,
                                    train_tokenizer)
from lmforge.errors import UserError
from lmforge.generate import translate
from lmforge.io import atomic_write, save_weights
from lmforge.losses import IGNORE_INDEX
from lmforge.metrics import translation_scores
from lmforge.model.seq2seq import EncoderDecoder
from lmforge.runs import WEIGHTS, load_run
from lmforge.tasks.base import Task, at_least_vocab
from lmforge.tasks.clm import next_token_loss
from lmforge.train.checkpoint import CKPT_DIR, average_checkpoints, checkpoints
from lmforge.train.distributed import Dist, full_weights

EVAL_BATCH_TOKENS = 8192


def collate(sources: list[list[int]], targets: list[list[int]], pad: int, bos: int) -> dict[str, torch.Tensor]:
    """Sources and targets (each ending in </s>) -> the padded encoder input and its mask, the decoder
    input (<s> + target without </s>) and the targets, padding ignored by the loss."""
    source = pad_batch(sources, pad)
    lengths = torch.tensor([len(s) for s in sources], device="cpu")
    return {"input": source, "source_mask": torch.arange(source.shape[1], device="cpu")[None, :] < lengths[:, None],
            "decoder_input": pad_batch([[bos] + t[:-1] for t in targets], pad),
            "target": pad_batch(targets, pad, fill=IGNORE_INDEX)}


def seq2seq_loss(model: EncoderDecoder, batch: dict, loss_cfg) -> torch.Tensor:
    """Summed (label-smoothed) cross-entropy of the targets: the decoder's next-token loss."""
    memory = model.encode(batch["input"], batch["source_mask"])
    hidden = model.decoder.features(batch["decoder_input"], memory=memory)
    return next_token_loss(hidden, model.head, batch["target"], loss_cfg)


SOURCE_TOKENIZER = "source_tokenizer.json"


def source_tokenizer(run_dir: Path) -> Tokenizer | None:
    """The source side's own tokenizer of a run with separate vocabularies; None for a joint one."""
    path = Path(run_dir)
    path = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return load_tokenizer(path / SOURCE_TOKENIZER) if (path / SOURCE_TOKENIZER).is_file() else None


def load_init(path: str) -> tuple[EncoderDecoder, Tokenizer, Config]:
    """The model, tokenizer and config of an earlier seq2seq or span run."""
    model, tok, init_cfg = load_run(path)
    if init_cfg.task not in ("seq2seq", "span"):
        raise UserError(f"config: seq2seq.init_from = {path}: a {init_cfg.task} run; expected an encoder-decoder "
                        "(a seq2seq or span run)")
    return model, tok, init_cfg


class Seq2SeqTask(Task):
    name = "seq2seq"
    final_report = "dev_scores.json"

    def setup(self) -> None:
        sc = self.cfg.seq2seq
        for key in ("train", "dev"):
            if not getattr(sc, key):
                raise UserError(f"config: seq2seq.{key}: expected {key} pairs (a TSV, or the source file with "
                                f"seq2seq.{key}_target)")
        train = read_parallel(sc.train, sc.train_target)
        self.dev = read_parallel(sc.dev, sc.dev_target)
        self.init = self.init_cfg = None
        tc = self.cfg.data.tokenizer
        run_dir = Path(self.cfg.log.run_dir) if self.cfg.log.run_dir else None
        # a run continued in its own directory (--resume) keeps the tokenizer it was trained with
        given = str(run_dir) if run_dir and (run_dir / "tokenizer.json").is_file() else tc.path
        if sc.init_from or given:
            if sc.init_from:
                self.init, self.tok, self.init_cfg = load_init(sc.init_from)
            else:
                self.tok = load_tokenizer(given)
            self.src_tok = source_tokenizer(sc.init_from or given)
            declared = (self.init_cfg or self.cfg).seq2seq.source_vocab_size  # the run started from decides
            if (self.src_tok is not None) != bool(declared):
                raise UserError(f"config: seq2seq.source_vocab_size = {declared} but "
                                f"{sc.init_from or given} has {'a' if self.src_tok is not None else 'no'} {SOURCE_TOKENIZER}")
        elif sc.source_vocab_size:  # a BPE per side
            self.src_tok = train_tokenizer([p.source for p in train], tc.kind, sc.source_vocab_size, SEQ2SEQ_SPECIALS,
                                           tc.lowercase)
            self.tok = train_tokenizer([p.target for p in train], tc.kind, tc.vocab_size, SEQ2SEQ_SPECIALS, tc.lowercase)
        else:  # one joint BPE of both sides
            texts = [p.source for p in train] + [p.target for p in train]
            self.tok, self.src_tok = train_tokenizer(texts, tc.kind, tc.vocab_size, SEQ2SEQ_SPECIALS, tc.lowercase), None
        self.pad, self.bos, self.eos = seq2seq_special_ids(self.tok)
        if self.src_tok is not None and seq2seq_special_ids(self.src_tok) != (self.pad, self.bos, self.eos):
            # one padding and end id per batch
            raise UserError("tokenizer: the source tokenizer's <pad> <s> </s> ids differ from the target's; "
                            "expected the same ids on both sides")
        self.resolve()
        limit = min(sc.max_length, self.cfg.model.max_seq_len)
        src, tgt = self._encode([p.source for p in train], self.src_tok), self._encode([p.target for p in train])
        keep = keep_by_length([len(s) for s in src], [len(t) for t in tgt], limit, sc.max_ratio)
        if len(keep) == 0:
            raise UserError(f"{sc.train}: no pair is within seq2seq.max_length = {limit} tokens and seq2seq.max_ratio "
                            f"= {sc.max_ratio}")
        if len(keep) < len(train):
            print(f"lmforge: {len(train) - len(keep)} of {len(train)} training pairs dropped (longer than {limit} "
                  f"tokens or a length ratio above {sc.max_ratio})")
        self.train_src, self.train_tgt = [src[i] for i in keep], [tgt[i] for i in keep]
        self.dev_src = [s[:limit - 1] + [self.eos] for s in self._encode([p.source for p in self.dev], self.src_tok)]
        self.dev_tgt = [t[:limit - 1] + [self.eos] for t in self._encode([p.target for p in self.dev])]

    def resolve(self):
        """The model shape and vocabularies of the run started from (seq2seq.init_from), and vocabulary
        sizes at least the tokenizers'."""
        cfg, sc = self.cfg, self.cfg.seq2seq
        if self.init_cfg is not None:
            cfg.model, init = self.init_cfg.model, self.init_cfg.seq2seq
            sc.decoder_layers, sc.source_vocab_size = init.decoder_layers, init.source_vocab_size
        if self.src_tok is not None:
            sc.source_vocab_size = max(sc.source_vocab_size, self.src_tok.get_vocab_size())
        cfg.model = at_least_vocab(cfg.model, self.tok.get_vocab_size())
        return cfg

    def _encode(self, texts: list[str], tok: Tokenizer | None = None) -> list[list[int]]:
        return [e.ids + [self.eos] for e in (tok or self.tok).encode_batch(texts, add_special_tokens=False)]

    def build_model(self, pretrained: bool = False) -> EncoderDecoder:
        model = super().build_model()
        if pretrained and getattr(self, "init", None) is not None:
            model.load_state_dict(self.init.state_dict())
        return model

    def _batches(self, sources, targets, indices) -> dict[str, torch.Tensor]:
        return collate([sources[i] for i in indices], [targets[i] for i in indices], self.pad, self.bos)

    def train_batches(self, seed: int) -> ExampleBatches:
        lengths = [max(len(s), len(t)) for s, t in zip(self.train_src, self.train_tgt)]
        make = lambda idx, epoch, batch: self._batches(self.train_src, self.train_tgt, idx)  # noqa: E731
        batches = ExampleBatches(lengths, self.cfg.train.batch_size, seed, make, self.shard,
                                 max_tokens=self.cfg.seq2seq.max_tokens)
        print(f"lmforge: {len(self.train_src)} training pairs, {batches.steps_per_epoch()} batches per epoch")
        return batches

    def eval_batches(self):
        order = np.argsort([max(len(s), len(t)) for s, t in zip(self.dev_src, self.dev_tgt)], kind="stable")
        lengths = [max(len(self.dev_src[i]), len(self.dev_tgt[i])) for i in order]
        start = 0
        while start < len(order):  # as many pairs as fit EVAL_BATCH_TOKENS
            end = start + 1
            while end < len(order) and lengths[end] * (end + 1 - start) <= EVAL_BATCH_TOKENS:
                end += 1
            yield self._batches(self.dev_src, self.dev_tgt, order[start:end])
            start = end

    def loss(self, model, batch) -> torch.Tensor:
        return seq2seq_loss(model, batch, self.cfg.loss)

    def selection(self) -> tuple[str, bool]:
        return ("bleu", True) if self.cfg.seq2seq.eval_bleu else ("loss", False)

    def translate(self, model, beam_size: int) -> list[str]:
        sc = self.cfg.seq2seq
        return translate(model, self.tok, [p.source for p in self.dev], beam_size=beam_size,
                         length_penalty=sc.length_penalty, max_length_ratio=sc.max_length_ratio,
                         source_tokenizer=self.src_tok)

    def scores(self, hypotheses: list[str]) -> tuple[dict, dict]:
        return translation_scores(hypotheses, [p.target for p in self.dev], self.cfg.seq2seq.bleu_tokenize)

    @torch.no_grad()
    def evaluate(self, model, to_device) -> dict[str, float]:
        metrics = super().evaluate(model, to_device)
        if self.cfg.seq2seq.eval_bleu:
            metrics.update(self.scores(self.translate(model, beam_size=1))[0])
        return metrics

    def flops_per_token(self, model) -> float:
        # per source token: a target token costs about as much as a source one (their counts are similar)
        mean = float(np.mean([len(s) for s in self.train_src]))
        return model.encoder.flops_per_token(mean) + model.decoder.flops_per_token(mean)

    def save_artifacts(self, run_dir: Path) -> None:
        save_tokenizer(self.tok, run_dir / "tokenizer.json")
        if self.src_tok is not None:
            save_tokenizer(self.src_tok, run_dir / SOURCE_TOKENIZER)

    def finish(self, model, run_dir: Path) -> str:
        sc = self.cfg.seq2seq
        lines = []
        if sc.average_last > 1:
            lines.append(self._keep_average(model, run_dir))
        hypotheses = self.translate(model, sc.beam_size)
        scores, signatures = self.scores(hypotheses)
        if self.main:
            text = "".join(h + "\n" for h in hypotheses)
            atomic_write(run_dir / "dev.translations.txt", lambda tmp: tmp.write_text(text, encoding="utf-8"))
            report = json.dumps({**scores, "beam_size": sc.beam_size, "signatures": signatures}, indent=2) + "\n"
            atomic_write(run_dir / self.final_report, lambda tmp: tmp.write_text(report))
        for i in np.linspace(0, len(self.dev) - 1, min(sc.samples, len(self.dev))).round().astype(int):
            lines += [f"--- dev line {self.dev[i].line} ---", f"source:     {self.dev[i].source}",
                      f"reference:  {self.dev[i].target}", f"hypothesis: {hypotheses[i]}"]
        lines += [f"dev BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  (beam {sc.beam_size}, length penalty "
                  f"{sc.length_penalty:g}; translations in {run_dir / 'dev.translations.txt'})",
                  f"  BLEU signature: {signatures['bleu']}", f"  chrF signature: {signatures['chrf']}"]
        return "\n".join(lines)

    def _keep_average(self, model, run_dir: Path) -> str:
        """Average the last k checkpoints' weights; keep the average (in model.safetensors too) if its
        greedy dev BLEU beats the best single checkpoint's."""
        found = checkpoints(run_dir / CKPT_DIR)[-self.cfg.seq2seq.average_last:]
        if len(found) < 2:
            return f"checkpoint averaging: only {len(found)} checkpoint kept; nothing to average"
        best_state = {k: v.clone() for k, v in model.state_dict().items()}
        best = self.scores(self.translate(model, beam_size=1))[0]["bleu"]
        model.load_state_dict(average_checkpoints(found))
        averaged = self.scores(self.translate(model, beam_size=1))[0]["bleu"]
        names = f"{found[0].name} .. {found[-1].name}"
        if averaged > best:
            if self.main:
                save_weights(full_weights(Dist(), model), run_dir / WEIGHTS,
                             {"averaged": names, "val_bleu": f"{averaged:.6f}"})
            return f"checkpoint averaging: {len(found)} checkpoints ({names}) greedy dev BLEU {averaged:.2f} > best " \
                   f"single {best:.2f}: kept the average"
        model.load_state_dict(best_state)
        return f"checkpoint averaging: {len(found)} checkpoints ({names}) greedy dev BLEU {averaged:.2f} <= best " \
               f"single {best:.2f}: kept the best"
