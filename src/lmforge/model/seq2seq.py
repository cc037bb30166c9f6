"""The encoder-decoder Transformer (Vaswani et al., 2017): a bidirectional encoder over the source and a
causal decoder whose blocks also attend to the encoder's output. Both are the same Transformer body as
the decoder-only and encoder-only models (model/transformer.py), the decoder built with cross=True.

Decoding keeps two caches: each decoder layer's self-attention keys and values grow by one position per
step (KVCache), and the cross-attention keys and values are computed once per source (`memory`)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import KVCache
from lmforge.model.transformer import Transformer

Memory = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]


class EncoderDecoder(nn.Module):
    """cfg describes both stacks (decoder_layers, if given, the decoder's depth). With one vocabulary
    (source_vocab_size None, the joint-BPE default) the encoder and decoder share one token embedding;
    tie_embeddings also ties it to the output projection. A source vocabulary of its own gets its own
    encoder embedding."""

    def __init__(self, cfg: ModelConfig, decoder_layers: int | None = None, source_vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        encoder_cfg = dataclasses.replace(cfg, vocab_size=source_vocab_size or cfg.vocab_size)
        decoder_cfg = dataclasses.replace(cfg, n_layer=decoder_layers or cfg.n_layer)
        self.encoder = Transformer(encoder_cfg, causal=False)
        self.decoder = Transformer(decoder_cfg, causal=True, cross=True)
        if source_vocab_size is None:
            self.decoder.tok_emb = self.encoder.tok_emb
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.decoder.tok_emb.weight
        self.encoder.apply(self.encoder._init)
        self.decoder.apply(self.decoder._init)  # depth-scaled by each stack's own depth
        self.decoder._init(self.head)

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> Memory:
        """Source ids [B, S] (pad mask: True at real tokens) -> what every decoder step attends to: each
        decoder layer's cross-attention keys and values, and the source mask."""
        hidden = self.encoder.features(source, pad_mask=source_mask)
        return [block.cross.memory_kv(hidden) for block in self.decoder.blocks], source_mask

    def decode(self, target: torch.Tensor, memory: Memory, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Target ids [B, T] (the decoder's input: start token + target so far) -> next-token logits
        [B, T, V]; with caches, target continues the positions already cached."""
        return self.head(self.decoder.features(target, caches, memory=memory))

    def forward(self, source: torch.Tensor, target: torch.Tensor,
                source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for the decoder input `target` given `source`."""
        return self.decode(target, self.encode(source, source_mask))

    @staticmethod
    def select(memory: Memory, index: torch.Tensor) -> Memory:
        """The memory of the sources at `index` (beam search keeps several hypotheses per source)."""
        kvs, mask = memory
        return [(k[index], v[index]) for k, v in kvs], None if mask is None else mask[index]

    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        return self.decoder.new_caches(batch, max_len)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
