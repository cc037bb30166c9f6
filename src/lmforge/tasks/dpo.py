"""Preference tuning of a causal LM (DPO and its variants) on pairs of answers to one prompt, the first
preferred: JSONL lines {"prompt": ... | "messages": [...], "chosen": ..., "rejected": ...}.

Each answer is rendered after its prompt as the sft task renders a conversation (the model's chat template,
or prompt + answer + end of text), so the answer's tokens are the targets and nothing else is. A batch of B
pairs is 2B sequences, chosen then rejected (padded, or packed with finetune.pack); the log-probability of
an answer is the sum over its tokens, read through the chunked output layer (losses.token_logprobs), never
the whole [tokens, vocab] logits.

The reference is the model the run starts from: for a PEFT run the same weights with the PEFT modules off
(peft.peft_disabled, no second copy); for full fine-tuning a frozen copy of the starting weights; SimPO
needs none. loss.name = dpo (with loss.label_smoothing: conservative DPO), ipo or simpo; loss.beta.
The dev metrics are the loss, reward accuracy (the chosen answer's implicit reward above the rejected
one's), the mean margin between them, the answers' mean log-probabilities and rewards, and how often the
model (logp_accuracy) and the reference (ref_logp_accuracy) find the chosen answer the more likely. The final
report adds, as sft's does, greedy answers to the dev prompts scored against the chosen answers.
"""

from __future__ import annotations

import copy

import torch

from lmforge.data.batches import pack_batch, pad_batch
from lmforge.data.labelled import Example
from lmforge.errors import UserError
from lmforge.losses import IGNORE_INDEX, LOSSES, REFERENCE_FREE, loss_options, preference_rewards, token_logprobs
from lmforge.peft import peft_disabled
from lmforge.tasks.finetune import Answers
from lmforge.tasks.sft import SFTTask


class _PairMetrics:
    """Over the dev pairs: reward accuracy (the chosen answer's implicit reward the larger), the mean margin,
    the answers' mean log-probabilities and rewards, and which answer the model itself finds the more likely
    (logp_accuracy) and the reference found (ref_logp_accuracy: where the run started)."""

    MEANS = ("chosen_logp", "rejected_logp", "chosen_reward", "rejected_reward", "margin")

    def __init__(self):
        self.sums, self.right, self.n = dict.fromkeys(self.MEANS, 0.0), dict.fromkeys(("reward", "logp", "ref"), 0), 0

    def update(self, values: dict[str, torch.Tensor]) -> None:
        for key in self.MEANS:
            self.sums[key] += float(values[key].sum())
        self.right["reward"] += int((values["margin"] > 0).sum())
        self.right["logp"] += int((values["chosen_logp"] > values["rejected_logp"]).sum())
        if values["ref_chosen"] is not None:
            self.right["ref"] += int((values["ref_chosen"] > values["ref_rejected"]).sum())
        self.n += len(values["margin"])

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"reward_accuracy": self.right["reward"] / n, "logp_accuracy": self.right["logp"] / n,
                "ref_logp_accuracy": self.right["ref"] / n, **{k: v / n for k, v in self.sums.items()}, "pairs": self.n}


def with_answer(e: Example, answer: str) -> Example:
    """The example as an sft example answered with `answer` (a prompt string stays a prompt/response pair)."""
    if isinstance(e.text, list):
        return Example(e.text + [{"role": "assistant", "content": answer}], label=answer, line=e.line)
    return Example(e.text, label=answer, line=e.line)


def sequence_sums(values: torch.Tensor, sequence: torch.Tensor, n: int) -> torch.Tensor:
    """The sum of `values` [M] by sequence index [M] into [n]."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, sequence, values)


class DPOTask(SFTTask):
    name = "dpo"
    default_metric = "loss"

    def setup(self) -> None:
        super().setup()
        if self.cfg.robust.augment or self.cfg.robust.adversarial != "none":
            raise UserError("config: robust.*: the dpo task takes no augmentation or adversarial training (a "
                            "changed answer is no longer the one the preference is about)")
        self.reference_model = None
        if self.needs_frozen_copy:
            self.reference_model = self._frozen(copy.deepcopy(self.start))

    @property
    def needs_frozen_copy(self) -> bool:
        return self.cfg.loss.name not in REFERENCE_FREE and self.cfg.peft.method == "none"

    @staticmethod
    def _frozen(model: torch.nn.Module) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    # -- the pairs -----------------------------------------------------------------------------------

    def encode_all(self, examples: list[Example], path: str) -> list[Answers]:
        """Each example's two answers rendered after its prompt as sft renders them; an answer that has no
        token left after the template and the length limit is an error naming its line."""
        unpaired = next((e for e in examples if e.label is None), None)
        if unpaired is not None:
            raise UserError(f"{path}:{unpaired.line}: no '{self.cfg.finetune.chosen_field}' and "
                            f"'{self.cfg.finetune.rejected_field}' answers; expected a preference pair")
        sides = [super(DPOTask, self).encode_all([with_answer(e, e.label[k]) for e in examples], path) for k in (0, 1)]
        for e, chosen, rejected in zip(examples, *sides):
            for name, row in (("chosen", chosen), ("rejected", rejected)):
                if all(t == IGNORE_INDEX for t in row.target):
                    raise UserError(f"{path}:{e.line}: the {name} answer has no tokens after the chat template and "
                                    f"finetune.max_length = {self.max_length}; expected a non-empty answer")
        return [Answers([c, r]) for c, r in zip(*sides)]

    def collate(self, rows: list[Answers], examples: list[Example]) -> dict[str, torch.Tensor]:
        """2B sequences, the chosen answers then the rejected ones: input, target, `sequence` (the index of
        the sequence each target belongs to; IGNORE_INDEX elsewhere) and `answer_len` [2B]; packed with
        finetune.pack (doc_ids then keep the sequences apart), else right-padded."""
        seqs = [r.rows[0] for r in rows] + [r.rows[1] for r in rows]  # the chosen answers, then the rejected
        ids, targets = [s.ids for s in seqs], [s.target for s in seqs]
        owner = [[k if t != IGNORE_INDEX else IGNORE_INDEX for t in s.target] for k, s in enumerate(seqs)]
        if self.cfg.finetune.pack:
            batch = pack_batch(ids, targets, self.max_length, self.pad_id)
            batch["sequence"] = pack_batch(ids, owner, self.max_length, self.pad_id)["target"]  # same placement
        else:
            batch = {"input": pad_batch(ids, self.pad_id), "target": pad_batch(targets, IGNORE_INDEX),
                     "sequence": pad_batch(owner, IGNORE_INDEX)}
        batch["answer_len"] = torch.tensor([sum(t != IGNORE_INDEX for t in s.target) for s in seqs],
                                           dtype=torch.long, device="cpu")
        return batch

    def count(self, batch: dict) -> int:
        return len(batch["answer_len"]) // 2  # the loss is summed over pairs

    def flops_per_token(self, model) -> float:
        # the reference pass adds a forward (a third of a training step's FLOPs) where there is one
        extra = 0.0 if self.cfg.loss.name in REFERENCE_FREE else 1 / 3
        return super().flops_per_token(model) * (1 + extra)

    # -- log-probabilities and the loss --------------------------------------------------------------

    def answer_logprobs(self, model, batch: dict) -> torch.Tensor:
        """Each sequence's answer log-probability [2B]: the sum over its target tokens."""
        hidden = model.features(batch["input"], doc_ids=batch.get("doc_ids"))
        scored = batch["target"] != IGNORE_INDEX
        head = model.head
        logps = token_logprobs(hidden[scored], head.weight, batch["target"][scored], head.bias)
        return sequence_sums(logps, batch["sequence"][scored], len(batch["answer_len"]))

    @torch.no_grad()
    def reference_logprobs(self, model, batch: dict) -> torch.Tensor | None:
        """The reference's answer log-probabilities [2B] (None for a reference-free loss)."""
        if self.cfg.loss.name in REFERENCE_FREE:
            return None
        if self.cfg.peft.method != "none":
            was = model.training
            model.eval()  # no dropout in the reference, as in a separate frozen model
            try:
                with peft_disabled(model):
                    return self.answer_logprobs(model, batch)
            finally:
                model.train(was)
        return self.answer_logprobs(self.frozen_reference(batch["input"].device), batch)

    def frozen_reference(self, device: torch.device) -> torch.nn.Module:
        """The frozen copy of the starting weights, on `device`; a trained run (evaluate, predict) loads it
        from finetune.init_from the first time it is needed."""
        if getattr(self, "reference_model", None) is None:
            self.reference_model = self._frozen(self._pretrained()[0])
        if next(self.reference_model.parameters()).device != device:
            self.reference_model.to(device)
        return self.reference_model

    def outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """The policy's and the reference's answer log-probabilities, split into chosen and rejected."""
        policy, reference = self.answer_logprobs(model, batch), self.reference_logprobs(model, batch)
        halves = lambda x: x.chunk(2) if x is not None else (None, None)  # noqa: E731
        (c, r), (rc, rr), (lc, lr) = halves(policy), halves(reference), halves(batch["answer_len"])
        return {"chosen": c, "rejected": r, "ref_chosen": rc, "ref_rejected": rr, "chosen_len": lc, "rejected_len": lr}

    def loss_from(self, outputs: dict, batch: dict) -> torch.Tensor:
        lc = self.cfg.loss
        return LOSSES[lc.name](**outputs, reduction="sum", **loss_options(lc))

    # -- metrics and the report ----------------------------------------------------------------------

    def metric_names(self):
        return ["loss", "reward_accuracy", "logp_accuracy", "margin"]

    def result_metrics(self):
        return ("exact_match", "chrf", "loss", "reward_accuracy", "logp_accuracy", "ref_logp_accuracy", "margin",
                "chosen_logp", "rejected_logp")

    def new_metrics(self):
        return _PairMetrics()

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        chosen, rejected = preference_rewards(self.cfg.loss.name, **outputs, beta=self.cfg.loss.beta)
        metrics.update({"chosen_logp": outputs["chosen"], "rejected_logp": outputs["rejected"],
                        "ref_chosen": outputs["ref_chosen"], "ref_rejected": outputs["ref_rejected"],
                        "chosen_reward": chosen, "rejected_reward": rejected, "margin": chosen - rejected})

    def measure(self, model, device, rows, examples):
        return super(SFTTask, self).measure(model, device, rows, examples)  # no perplexity: not a token loss

    def gold_answer(self, e: Example) -> str | None:
        return e.label[0] if e.label is not None else None
