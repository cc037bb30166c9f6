"""Transformer stacks. GPT: the decoder-only causal language model."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import Block, KVCache, make_norm, rope_tables


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=True) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_out", False) and self.cfg.depth_scaled_init:
                std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def features(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Token ids [B, T] -> final hidden states [B, T, d]. With caches, idx continues the cached prefix."""
        B, T = idx.shape
        start = caches[0].length if caches else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches else None)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, V]."""
        return self.head(self.features(idx, caches))

    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        p = self.tok_emb.weight
        return [KVCache(batch, self.cfg.n_kv_head, max_len or self.cfg.max_seq_len, self.cfg.head_dim, p.device, p.dtype)
                for _ in range(self.cfg.n_layer)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores and
        values, 12 * layers * width * context (the PaLM paper's appendix B accounting)."""
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * self.cfg.n_layer * self.cfg.d_model * self.cfg.max_seq_len
