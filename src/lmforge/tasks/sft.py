"""Supervised fine-tuning of a causal LM on conversations (`messages` JSONL lines) or prompt/response
pairs: the model is trained to predict the assistant's turns only; everything else carries no loss.

With a chat template (the model's own, or finetune.chat_template = chatml) a conversation, or a pair as a
user turn and an assistant turn, is rendered as the model will see it when chatting, and the assistant's
tokens are those the template marks ({% generation %}), or else those each answer adds (chat.py). A model
without a template reads a pair as prompt + response joined with nothing between, then its end-of-text
token. The logits are never formed for the whole batch: the loss fuses the output layer with the
cross-entropy in chunks, and the token accuracy reads the predictions at the answer tokens only. The
final report also answers every dev example greedily and scores the answers: exact match and chrF."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from torch import nn

from lmforge import chat
from lmforge.data.batches import pack_batch, pad_batch
from lmforge.data.labelled import Example
from lmforge.errors import UserError
from lmforge.generate import generate_texts, prompt_ids
from lmforge.losses import IGNORE_INDEX, rows_per_chunk
from lmforge.metrics import translation_scores
from lmforge.runs import chat_template, end_token_ids
from lmforge.tasks.clm import next_token_loss
from lmforge.tasks.finetune import Encoded, FinetuneTask


class _TokenMetrics:
    """Next-token accuracy over response tokens (the loss is summed by the caller)."""

    def __init__(self):
        self.correct = self.n = 0

    def update(self, pred: torch.Tensor, gold: torch.Tensor) -> None:
        self.correct += int((pred == gold).sum())
        self.n += len(gold)

    def result(self) -> dict:
        return {"token_accuracy": self.correct / max(self.n, 1), "tokens": self.n}


def next_tokens(hidden: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """The most likely token after each of the rows of hidden states [M, d]: argmax of head(hidden), a
    chunk of rows at a time, so the [M, V] logits are never held at once."""
    rows = rows_per_chunk(hidden.device, head.out_features)
    return torch.cat([head(h).argmax(-1) for h in hidden.split(rows)])


class ChatTemplated:
    """What a fine-tuning task that renders conversations shares (sft, reward): the chat template, read from
    finetune.init_from while training and from the run itself afterwards. Mixed in before FinetuneTask."""

    chat_source: Path | None = None  # where the template and end tokens are read; init_from while training

    def prepare_inference(self, tok, run_dir: Path | None = None) -> None:
        super().prepare_inference(tok, run_dir)
        self.chat_source = run_dir  # the run keeps its template and end tokens (runs.HF_SIDE_FILES)

    @functools.cached_property
    def chat(self) -> tuple[str, dict[str, str]] | None:
        """(template, special-token strings) to render with, or None: a model without a template, auto."""
        name = self.cfg.finetune.chat_template
        return chat_template(self.chat_source or self.cfg.finetune.init_from, None if name == "auto" else name)


class SFTTask(ChatTemplated, FinetuneTask):
    name = "sft"
    default_metric = "loss"
    needs_decoder = True

    def label_map(self, train, dev):
        return None

    @functools.cached_property
    def end_ids(self) -> set[int]:
        """Where an answer ends: the model's own end tokens (a chat model's end of turn), the end of turn of
        a named template or the template's eos_token where the tokenizer has them, and end of text."""
        own = end_token_ids(self.chat_source or self.cfg.finetune.init_from)
        turn = [chat.END_OF_TURN.get(self.cfg.finetune.chat_template), (self.chat or ("", {}))[1].get("eos_token")]
        own |= {i for t in turn if t and (i := self.tokenizer.token_to_id(t)) is not None}
        return own | ({self.eos_id} if self.eos_id is not None else set())

    def conversation(self, e: Example, answered: bool = True) -> list[dict]:
        """The example's turns; a pair as a user turn and (answered, where it has one) the assistant's."""
        turns = e.text if isinstance(e.text, list) else [{"role": "user", "content": e.text}]
        if not isinstance(e.text, list) and answered and e.label is not None:
            turns = turns + [{"role": "assistant", "content": e.label}]
        if not answered and turns[-1]["role"] == "assistant":
            turns = turns[:-1]  # the question of the last answer, which is the reference
        return turns

    def encode_all(self, examples: list[Example], path: str) -> list[Encoded]:
        if self.chat is not None:
            return [self._encode_chat(e, f"{path}:{e.line}") for e in examples]
        talk = next((e for e in examples if isinstance(e.text, list)), None)
        if talk is not None:
            raise UserError(f"{path}:{talk.line}: a conversation needs a chat template, and the model has none; "
                            "set finetune.chat_template = chatml")
        return self._encode_pairs(examples)

    def _encode_chat(self, e: Example, where: str) -> Encoded:
        """The rendered conversation's tokens, each assistant token the target of the one before it."""
        template, tokens = self.chat
        text, spans = chat.render_with_answers(template, self.conversation(e), tokens, where)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        answer = [any(a < end and start < b for a, b in spans) for start, end in enc.offsets]
        ids = enc.ids
        if len(ids) > self.max_length + 1:
            first = answer.index(True) if True in answer else len(ids)
            if first > self.max_length:
                raise UserError(f"{where}: the conversation has {first} tokens before its first answer; "
                                f"finetune.max_length is {self.max_length}")
            ids, answer = ids[:self.max_length + 1], answer[:self.max_length + 1]
        return Encoded(ids[:-1], None, [t if a else IGNORE_INDEX for t, a in zip(ids[1:], answer[1:])])

    def _encode_pairs(self, examples: list[Example]) -> list[Encoded]:
        """prompt + response + end of text, with no template: the prompt carries no loss."""
        tok = self.tokenizer
        prompts = tok.encode_batch([e.text for e in examples], add_special_tokens=False)
        responses = tok.encode_batch([e.label or "" for e in examples], add_special_tokens=False)
        end = [self.eos_id] if self.eos_id is not None else []
        rows = []
        for e, p, r in zip(examples, prompts, responses):
            p, r = p.ids, r.ids + end
            p = p[-(self.max_length // 2):] if len(p) + len(r) > self.max_length + 1 else p  # keep room for the answer
            ids = (p + r)[:self.max_length + 1]
            target = [IGNORE_INDEX] * (len(p) - 1) + ids[len(p):]
            rows.append(Encoded(ids[:-1], None, target[:len(ids) - 1]))
        return rows

    def targets(self, rows, examples) -> dict[str, torch.Tensor]:
        return {"target": pad_batch([r.target for r in rows], IGNORE_INDEX)}

    def collate(self, rows, examples) -> dict[str, torch.Tensor]:
        """finetune.pack: the batch's examples packed into rows of up to max_length tokens (each attends to
        itself only), the same examples and targets as the padded batch, so the same loss."""
        if not self.cfg.finetune.pack:
            return super().collate(rows, examples)
        return pack_batch([r.ids for r in rows], [r.target for r in rows], self.max_length, self.pad_id)

    def outputs(self, model, batch) -> tuple[torch.Tensor, nn.Linear]:
        """(the last hidden states [B, T, d], the output layer): the logits are left to the loss's chunks."""
        return model.features(batch["input"], doc_ids=batch.get("doc_ids")), model.head

    def loss_from(self, outputs, batch) -> torch.Tensor:
        hidden, head = outputs
        return next_token_loss(hidden, head, batch["target"], self.cfg.loss)

    def metric_names(self):
        return ["loss", "ppl", "token_accuracy"]

    def result_metrics(self):
        return ("exact_match", "chrf", "loss", "ppl", "token_accuracy")

    def new_metrics(self):
        return _TokenMetrics()

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        hidden, head = outputs
        scored = batch["target"] != IGNORE_INDEX
        metrics.update(next_tokens(hidden[scored], head), batch["target"][scored])

    def measure(self, model, device, rows, examples):
        # ppl is the mean loss's, which the metrics object does not see
        scalars, metrics = super().measure(model, device, rows, examples)
        scalars["ppl"] = math.exp(min(scalars["loss"], 50.0))
        return scalars, metrics

    def report(self, model, examples, path, confusion=None):
        """The loss of the references, then each example answered greedily: exact match and chrF of the
        answers against the references."""
        full, text = super().report(model, examples, path, confusion)
        answered = [e for e in examples if self.gold_answer(e) is not None]
        gold = [self.gold_answer(e) for e in answered]
        answers = self.respond(model, answered, path)
        exact = sum(a.strip() == g.strip() for a, g in zip(answers, gold)) / max(len(answered), 1)
        chrf = translation_scores(answers, gold)[0]["chrf"] if answered else 0.0
        full.update(exact_match=exact, chrf=chrf)
        return full, text.rstrip("\n") + f"  exact_match {exact:.4f}  chrf {chrf:.2f}"

    def gold_answer(self, e: Example) -> str | None:
        """The answer the report scores the model's own against (the last assistant turn); None: none."""
        return e.label

    def predict(self, model, examples, path) -> list[dict]:
        """Each example's greedy answer (generated, so predictions() is not used)."""
        answers = self.respond(model, examples, path)
        return [{"messages" if isinstance(e.text, list) else "prompt": e.text, "response": a}
                for e, a in zip(examples, answers)]

    @torch.no_grad()
    def respond(self, model, examples: list[Example], path: str = "input") -> list[str]:
        """The examples' greedy answers (each at most max_length tokens, ending at the model's end tokens),
        eval.batch_size at a time: prompts of similar length left-padded into one batch, one forward pass
        a step for all of them (200 dev answers one by one took a 135M model 15 minutes on 2 CPU cores)."""
        prompts = [self.prompt_tokens(e, path) for e in examples]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers = [""] * len(prompts)
        size = self.cfg.eval.batch_size
        for start in range(0, len(order), size):
            chosen = order[start:start + size]
            batch = [prompts[i] for i in chosen]
            room = self.cfg.model.max_seq_len - max(len(p) for p in batch)
            texts = generate_texts(model, self.tokenizer, batch, max_new_tokens=min(room, self.max_length),
                                   temperature=0.0, end_ids=self.end_ids)
            for i, text in zip(chosen, texts):
                answers[i] = text
        return answers

    def prompt_tokens(self, e: Example, path: str) -> list[int]:
        """What the model answers: the conversation up to its last answer, in the chat template, or the
        prompt's last max_length / 2 tokens."""
        if self.chat is not None:
            template, tokens = self.chat
            text = chat.render(template, self.conversation(e, answered=False), True, tokens, f"{path}:{e.line}")
            prompt = self.tokenizer.encode(text, add_special_tokens=False).ids
        else:
            prompt = self.tokenizer.encode(e.text, add_special_tokens=False).ids[-(self.max_length // 2):]
        if len(prompt) >= self.cfg.model.max_seq_len:
            raise UserError(f"{path}:{e.line}: the prompt has {len(prompt)} tokens, the model's whole context")
        return prompt_ids(self.tokenizer, prompt)  # an empty one starts from the end-of-text token
