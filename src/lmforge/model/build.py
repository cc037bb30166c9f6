"""One place that turns a config into a model: `build_model(cfg)` for every architecture and head.

A task's model kind comes from the task registry (`TaskSpec.model`), its shape from `cfg.model`, its
head from the task's section (labels, pooling, the encoder-decoder's depths). Runs, the Hugging Face
import and the tasks all build through here, so a run's weights always load into the model the run
trained.
"""

from __future__ import annotations

from torch import nn

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
    return BUILDERS[registry.spec(cfg.task).model](cfg)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied parameter counts once."""
    params = list(model.parameters())  # shared parameters once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return (f"trainable {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
            f"({100 * trainable / max(total, 1):.1f}%)")
