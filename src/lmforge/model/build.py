"""One place that turns a config into a model: `build_model(cfg)` for every architecture and head.

A task's model kind comes from the task registry (`TaskSpec.model`), its shape from `cfg.model`, its
head from the task's section (labels, pooling, the encoder-decoder's depths). Runs, the Hugging Face
import and the tasks all build through here, so a run's weights always load into the model the run
trained.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.io import size_text
from lmforge.model.seq2seq import EncoderDecoder
from lmforge.model.transformer import GPT, MaskedLM, SequenceClassifier, TokenTagger
from lmforge.tasks import registry


def _classifier(cfg) -> SequenceClassifier:
    fc = cfg.finetune
    # one number: a regression's value, a reward model's score
    n_out = 1 if registry.spec(cfg.task).label in ("value", "preference") else len(fc.labels)
    return SequenceClassifier(cfg.model, n_out, fc.pooling, fc.body == "decoder", fc.classifier_dropout)


def _tagger(cfg) -> TokenTagger:
    fc = cfg.finetune
    return TokenTagger(cfg.model, len(fc.labels), fc.body == "decoder", fc.classifier_dropout)


def _encoder_decoder(cfg) -> EncoderDecoder:
    sc = cfg.seq2seq
    return EncoderDecoder(cfg.model, decoder_layers=sc.decoder_layers or None,
                          source_vocab_size=sc.source_vocab_size or None)


BUILDERS = {
    "gpt": lambda cfg: GPT(cfg.model),
    "masked_lm": lambda cfg: MaskedLM(cfg.model, nsp=cfg.mlm.nsp),
    "sequence_classifier": _classifier,
    "token_tagger": _tagger,
    "encoder_decoder": _encoder_decoder,
}


def build_model(cfg) -> nn.Module:
    """The model `cfg` describes, with fresh weights (from the torch RNG) and no PEFT modules."""
    check_memory(cfg)
    return BUILDERS[registry.spec(cfg.task).model](cfg)


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the machine's available memory, or less where a cgroup
    limits it; None where neither can be read."""
    found = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        found.append(1024 * int(next(line.split()[1] for line in lines if line.startswith("MemAvailable:"))))
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    if not found:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return min(found) if found else None


def _weight_terms(m) -> dict[tuple[str, ...], int]:
    """At least how many parameters a model of ModelConfig `m` has, by the size fields each part grows with:
    the token embedding, the blocks, learned positions (heads, norms and biases left out: a lower bound)."""
    d = m.d_model
    attention = d * m.head_dim * (2 * m.n_head + 2 * m.n_kv_head)  # q and output; k and v
    mlp = d * m.d_ff * (3 if m.mlp == "swiglu" else 2)
    terms = {("vocab_size", "d_model"): m.vocab_size * d, ("n_layer", "d_model", "d_ff"): m.n_layer * (attention + mlp)}
    if m.pos == "learned":
        terms[("max_seq_len", "d_model")] = m.max_seq_len * d
    return terms


def check_memory(cfg, where: str = "config", names: dict[str, str] | None = None) -> None:
    """Refuse, before anything is allocated, a model whose float32 weights alone need more memory than this
    machine has available: a vocabulary of 1e11 would otherwise fail deep in torch's allocator, or have the
    process killed. The line names the size fields of the model's largest part; names: how `where` calls a
    model field (config.json's keys for an imported model; default model.FIELD)."""
    if torch.get_default_device().type == "meta":  # a streamed import allocates tensor by tensor, quantised
        return
    terms = _weight_terms(cfg.model)
    need, have = 4 * sum(terms.values()), available_memory()
    if have is None or need <= have:
        return
    largest = max(terms, key=terms.get)
    sizes = ", ".join(f"{(names or {}).get(k, f'model.{k}')} = {getattr(cfg.model, k)}" for k in largest)
    raise UserError(f"{where}: {sizes}: the model's weights alone would take {size_text(need)} in float32, more than "
                    f"the {size_text(have)} of memory available here; expected a smaller model")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied parameter counts once."""
    params = list(model.parameters())  # shared parameters once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return (f"trainable {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
            f"({100 * trainable / max(total, 1):.1f}%)")
