"""A reward model: one score per answer from a causal LM or an encoder with a scalar head, trained on
preference pairs with the Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)).

The pairs are dpo's files ({"prompt" | "messages", "chosen", "rejected"} lines, data/labelled.py); the
model is classify's SequenceClassifier with one output, pooled as classify pools (the last real token of a
causal body; BERT's pooler, or [CLS] where the checkpoint has none, for an encoder). Each answer is read
as the model will read it when it scores:

- a causal LM with a chat template (its own, or finetune.chat_template = chatml): the conversation with
  the answer as the assistant's last turn, rendered as sft renders it; one longer than finetune.max_length
  keeps its last max_length tokens (the answer and what fits of the turns before it);
- otherwise (an encoder, or a causal LM without a template): the prompt and the answer as a sentence
  pair, as classify reads one ([CLS] prompt [SEP] answer [SEP], or prompt eos answer eos), cut longest
  first; a conversation needs a causal LM with a template.

A batch of B pairs holds 2B rows, the chosen answers then the rejected ones; its loss is summed over the
pairs and count() is B, so accumulated micro-batches equal one large batch. `lmforge predict` (and the
server's /v1/score) scores answered lines, {"messages": [..., the assistant's answer]} or {"prompt",
"response"}; a pair line gets both scores and which one is preferred.
"""

from __future__ import annotations


import torch

from lmforge import chat
from lmforge.data.labelled import Example
from lmforge.errors import UserError
from lmforge.losses import LOSSES, loss_options
from lmforge.tasks.classify import SequenceTask
from lmforge.tasks.finetune import Answers, Encoded
from lmforge.tasks.sft import ChatTemplated


class PreferenceMetrics:
    """How often, and by how much, the chosen answer scores above the rejected one (the loss is summed by
    the caller)."""

    def __init__(self):
        self.right = self.n = 0
        self.chosen = self.rejected = 0.0

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.right += int((chosen > rejected).sum())
        self.chosen += float(chosen.sum())
        self.rejected += float(rejected.sum())
        self.n += len(chosen)

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"accuracy": self.right / n, "margin": (self.chosen - self.rejected) / n,
                "chosen_score": self.chosen / n, "rejected_score": self.rejected / n, "pairs": self.n}


class RewardTask(ChatTemplated, SequenceTask):
    name = "reward"
    default_metric = "accuracy"

    def label_map(self, train, dev):
        return None

    def setup(self) -> None:
        if self.cfg.robust.augment:
            raise UserError("config: robust.augment: the reward task's examples are prompts with answer pairs, which "
                            "augmentation does not edit; leave robust.augment empty")
        super().setup()

    # -- encoding ------------------------------------------------------------------------------------

    @property
    def template(self) -> tuple[str, dict[str, str]] | None:
        """The chat template the answers are rendered in: a causal LM's (chat); an encoder reads pairs."""
        if not self.encoder:
            return self.chat
        if self.cfg.finetune.chat_template != "auto":
            raise UserError(f"config: finetune.chat_template = {self.cfg.finetune.chat_template}: an encoder reads the "
                            "prompt and the answer as a sentence pair; a chat template applies to a causal LM")
        return None

    def encode_all(self, examples: list[Example], path: str) -> list[Answers]:
        return self.encode_at(examples, [f"{path}:{e.line}" for e in examples])

    def encode_at(self, examples: list[Example], places: list[str]) -> list[Answers]:
        """Each example's rows; an example's errors name its place (FILE:LINE, or a request's field)."""
        fc, out = self.cfg.finetune, []
        for e, where in zip(examples, places):
            answers = self.answers(e, where)
            if self.template is not None:
                rows = [self._encode_chat(e.text, answer, name, where) for name, answer in answers]
            else:
                rows = [self._encode_pair(e.text, answer, name, where) for name, answer in answers]
            if len(rows) == 2 and rows[0].ids == rows[1].ids:
                how = "chat template" if self.template is not None else "tokenizer"
                raise UserError(f"{where}: '{fc.chosen_field}' and '{fc.rejected_field}' are the same tokens after the "
                                f"{how} and the cut to finetune.max_length = {self.max_length}; expected answers the "
                                "model can tell apart")
            out.append(Answers(rows))
        return out

    def answers(self, e: Example, where: str) -> list[tuple[str, str]]:
        """(the field it came from, the answer) for each answer of the example: a pair's two, or the one to score."""
        fc = self.cfg.finetune
        if e.label is not None:
            return [(f"'{fc.chosen_field}'", e.label[0]), (f"'{fc.rejected_field}'", e.label[1])]
        if e.pair is not None:
            return [(f"messages[{len(e.text)}].content" if isinstance(e.text, list) else f"'{fc.response_field}'",
                     e.pair)]
        raise UserError(f"{where}: no answer to score; expected {{\"messages\": [..., the assistant's answer]}}, "
                        f"{{\"{fc.prompt_field}\": ..., \"{fc.response_field}\": ...}} or a pair with "
                        f"'{fc.chosen_field}' and '{fc.rejected_field}'")

    def _encode_chat(self, prompt: str | list[dict], answer: str, name: str, where: str) -> Encoded:
        """The conversation, the answer its last turn, in the chat template; its last max_length tokens."""
        template, tokens = self.template
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = chat.render(template, turns + [{"role": "assistant", "content": answer}], False, tokens, where)
        try:
            unanswered = chat.render(template, turns + [{"role": "assistant", "content": ""}], False, tokens, where)
        except UserError:  # a template that refuses an empty answer renders a real one differently
            unanswered = None
        if text == unanswered:
            raise UserError(f"{where}: {name} is empty after the chat template (it renders none of the answer); "
                            "expected an answer the model sees")
        return Encoded(self.tokenizer.encode(text, add_special_tokens=False).ids[-self.max_length:])

    def _encode_pair(self, prompt: str | list[dict], answer: str, name: str, where: str) -> Encoded:
        """The prompt and the answer as a sentence pair (SequenceTask.join)."""
        if isinstance(prompt, list):
            fc = self.cfg.finetune
            fix = ("a causal LM with a chat template reads conversations" if self.encoder else
                   "a causal LM trains on them with finetune.chat_template = chatml")
            raise UserError(f"{where}: a conversation needs a chat template, and this model has none ({fix}); "
                            f"expected a '{fc.prompt_field}' in place of 'messages'")
        b = self.tokenizer.encode(answer, add_special_tokens=False).ids
        if not b:
            raise UserError(f"{where}: {name} is empty after the tokenizer (no tokens); expected an answer the model "
                            "sees")
        return self.join(self.tokenizer.encode(prompt, add_special_tokens=False).ids, b)

    def collate(self, rows: list[Answers], examples: list[Example]) -> dict[str, torch.Tensor]:
        """One row per answer: every example's first (a pair's chosen), then the second ones (rejected)."""
        flat = [a.rows[0] for a in rows] + [a.rows[1] for a in rows if len(a.rows) > 1]
        return super().collate(flat, examples)

    def targets(self, rows, examples) -> dict[str, torch.Tensor]:
        return {}  # the order of the rows is the preference

    # -- scores, loss, metrics -----------------------------------------------------------------------

    def outputs(self, model, batch) -> torch.Tensor:
        """One score per row [2B] (fp32)."""
        return super().outputs(model, batch).squeeze(-1)

    def loss_from(self, outputs, batch) -> torch.Tensor:
        chosen, rejected = outputs.chunk(2)
        fn = LOSSES[self.cfg.loss.name]
        return fn(chosen, rejected, reduction="sum", **loss_options(self.cfg.loss, outputs.device))

    def count(self, batch) -> int:
        return int(batch["input"].shape[0]) // 2  # pairs

    def metric_names(self):
        return ["loss", "accuracy", "margin", "chosen_score", "rejected_score"]

    def result_metrics(self):
        return ("accuracy", "margin", "loss")

    def selection(self) -> tuple[str, bool]:
        metric, _ = super().selection()
        return metric, metric not in ("loss", "rejected_score")

    def new_metrics(self):
        return PreferenceMetrics()

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        chosen, rejected = outputs.detach().chunk(2)
        metrics.update(chosen.cpu(), rejected.cpu())

    def predictions(self, outputs, batch, rows, examples) -> list[dict]:
        """{prompt, response, score} or {messages (the answer last), score} per answered example; for a pair
        {prompt | messages, chosen, rejected, chosen_score, rejected_score, preferred}."""
        scores = outputs.float().tolist()
        seconds = iter(scores[len(examples):])
        records = []
        for e, score in zip(examples, scores):
            talk = isinstance(e.text, list)
            if e.label is None:
                records.append({"messages": e.text + [{"role": "assistant", "content": e.pair}], "score": score} if talk
                               else {"prompt": e.text, "response": e.pair, "score": score})
                continue
            other = next(seconds)
            preferred = "chosen" if score > other else "rejected" if other > score else "tie"
            records.append({"messages" if talk else "prompt": e.text, "chosen": e.label[0], "rejected": e.label[1],
                            "chosen_score": score, "rejected_score": other, "preferred": preferred})
        return records
