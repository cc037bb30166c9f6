"""Transformer stacks: one body (embeddings + blocks) shared by GPT, the decoder-only causal language
model, MaskedLM, the BERT-style bidirectional encoder with its masked-LM (and next-sentence) heads, and
the fine-tuning models: SequenceClassifier (classification, regression, multi-label) and TokenTagger.

Parameter names are flat (tok_emb, blocks.3.attn.qkv, norm, head, ...) in both, so optimizer groups
and the Hugging Face key maps in hf/keymap.py see one naming scheme.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import Block, KVCache, activation, make_norm, rope_tables


class Transformer(nn.Module):
    """Token (+ position, + segment) embeddings, then n_layer blocks; causal or bidirectional."""

    causal = True

    def __init__(self, cfg: ModelConfig, causal: bool | None = None, cross: bool = False):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        if causal is not None:  # a fine-tuning head on a decoder keeps the decoder's causal attention
            self.causal = causal
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.seg_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        post = cfg.norm_position == "post"
        self.emb_norm = make_norm(cfg) if post else None  # post-norm stacks normalise the embeddings instead
        self.drop = nn.Dropout(cfg.dropout)
        # cross: each block also attends to an encoder's output (the decoder of an encoder-decoder)
        self.blocks = nn.ModuleList(Block(cfg, self.causal, cross) for _ in range(cfg.n_layer))
        self.norm = None if post else make_norm(cfg)
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def reset_buffers(self) -> None:
        """The buffers computed afresh (the RoPE tables, which are not in a state dict), on the default
        device: for a model built on the meta device and then loaded tensor by tensor (hf.load's
        streaming import of a quantised base)."""
        if self.cfg.pos == "rope":
            self.rope_cos, self.rope_sin = rope_tables(self.cfg)

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

    def features(self, idx: torch.Tensor, caches: list[KVCache] | None = None, segments: torch.Tensor | None = None,
                 pad_mask: torch.Tensor | None = None, memory: tuple[list, torch.Tensor | None] | None = None,
                 left_pad: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> final hidden states [B, T, d].

        caches: idx continues the cached prefix (decoding). segments: [B, T] segment ids (0 when not
        given). pad_mask: bool [B, T], True at real tokens, padding on the right; no position attends to
        padding. memory (cross blocks): each block's encoder keys and values and the source's pad mask.
        left_pad: [B] padding tokens at the start of each row (a causal stack decoding prompts of different
        lengths together): positions count from each row's first real token, and no query attends to them.
        doc_ids: [B, T] the document of each token of a packed row (documents lie in runs of equal ids):
        a token attends only to its own document, whose positions count from 0 at its first token.
        """
        B, T = idx.shape
        start = caches[0].length if caches else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        if doc_ids is not None and (caches or left_pad is not None):
            raise ValueError("doc_ids (packed rows) are for training passes, without a KV cache or left padding")
        x = self.tok_emb(idx)
        steps = torch.arange(start, start + T, device=idx.device)
        pos = steps if left_pad is None else (steps - left_pad[:, None]).clamp(min=0)  # [T] or [B, T]
        if doc_ids is not None:
            pos = document_positions(doc_ids)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope = (self.rope_cos[pos], self.rope_sin[pos])
            if pos.dim() == 2:  # per-row tables [B, 1, T, D] for [B, H, T, D] queries and keys
                rope = (rope[0][:, None], rope[1][:, None])
        if self.seg_emb is not None:
            x = x + (self.seg_emb(segments) if segments is not None else self.seg_emb.weight[0])
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        # a causal stack needs no padding mask: padding sits on the right, after every real token
        mask = pad_mask[:, None, None, :] if pad_mask is not None and not self.causal else None
        if left_pad is not None:
            keys = torch.arange(start + T, device=idx.device)
            # a padding query sees itself only (a row of no keys would make NaNs that reach later layers)
            mask = ((keys >= left_pad[:, None])[:, None, :] | (keys == steps[:, None]))[:, None]  # [B, 1, T, S]
        if doc_ids is not None:
            # block-diagonal: a causal Attention adds its own causal mask to any mask it is given
            same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # [B, 1, T, T]
            mask = same if mask is None else mask & same
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches else None, mask, (memory[0][i], memory[1]) if memory else None)
        return self.norm(x) if self.norm is not None else x

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        """One empty self-attention KV cache per block, for decoding up to max_len positions."""
        p = self.tok_emb.weight
        return [KVCache(batch, self.cfg.n_kv_head, max_len or self.cfg.max_seq_len, self.cfg.head_dim, p.device, p.dtype)
                for _ in self.blocks]

    def flops_per_token(self, context: float | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores and
        values, 12 * layers * width * context (the PaLM paper's appendix B accounting); context defaults
        to the model's, fine-tuning passes its examples' mean length."""
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * self.cfg.n_layer * self.cfg.d_model * (context or self.cfg.max_seq_len)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions that restart at 0 wherever doc_ids changes along a row (a packed document's start)."""
    steps = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    first = torch.ones(doc_ids.shape[0], 1, dtype=torch.bool, device=doc_ids.device)
    starts = torch.cat([first, doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    # each token's document starts at the last start at or before it
    return steps - torch.where(starts, steps, 0).cummax(dim=1).values


class GPT(Transformer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None,
                left_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, V]; left_pad: see features."""
        return self.head(self.features(idx, caches, left_pad=left_pad))



class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> activation -> norm, then the output projection (tied to the
    token embedding unless tie_embeddings is off) with a bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.act = activation("gelu" if cfg.mlp == "swiglu" else cfg.mlp)
        self.norm = make_norm(cfg)
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states the output projection (self.out) turns into logits."""
        return self.norm(self.act(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.transform(hidden))


class MaskedLM(Transformer):
    """A bidirectional encoder with the masked-LM head and, with nsp, BERT's pooler (dense + tanh on the
    first token) and the two-way next-sentence head."""

    causal = False

    def __init__(self, cfg: ModelConfig, nsp: bool = False):
        super().__init__(cfg)
        self.mlm_head = MLMHead(cfg)
        if cfg.tie_embeddings:
            self.mlm_head.out.weight = self.tok_emb.weight
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if nsp else None
        self.nsp_head = nn.Linear(cfg.d_model, 2) if nsp else None
        self.apply(self._init)
        nn.init.zeros_(self.mlm_head.out.bias)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))

    def forward(self, idx: torch.Tensor, segments: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> masked-LM logits [B, T, V]."""
        return self.mlm_head(self.features(idx, segments=segments, pad_mask=pad_mask))


POOLINGS = ("pooler", "cls", "mean", "last")


class SequenceClassifier(Transformer):
    """The body, one vector per sequence (pooling), dropout and a linear head with n_out outputs: class
    logits, regression values or per-label logits.

    pooling: pooler = BERT's dense + tanh on the first token; cls = the first token; mean = the mean over
    real tokens; last = the last real token (the only one a causal decoder has seen the whole input at).
    """

    def __init__(self, cfg: ModelConfig, n_out: int, pooling: str, causal: bool, dropout: float = 0.1):
        super().__init__(cfg, causal)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling}")
        self.pooling = pooling
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if pooling == "pooler" else None
        self.head_drop = nn.Dropout(dropout)
        # GPT-2's and Llama's sequence-classification `score` layers have no bias; BERT's classifier has one
        self.classifier = nn.Linear(cfg.d_model, n_out, bias=not causal)
        self.apply(self._init)

    def pool(self, hidden: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "pooler":
            return torch.tanh(self.pooler(hidden[:, 0]))
        if self.pooling == "cls":
            return hidden[:, 0]
        if pad_mask is None:
            return hidden.mean(1) if self.pooling == "mean" else hidden[:, -1]
        if self.pooling == "mean":
            weights = pad_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        last = pad_mask.long().sum(1).clamp(min=1) - 1  # padding sits on the right
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, idx: torch.Tensor, segments: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> outputs [B, n_out]."""
        hidden = self.features(idx, segments=segments, pad_mask=pad_mask)
        return self.classifier(self.head_drop(self.pool(hidden, pad_mask)))


class TokenTagger(Transformer):
    """The body, dropout and a linear layer giving each token's tag logits (NER)."""

    def __init__(self, cfg: ModelConfig, n_tags: int, causal: bool, dropout: float = 0.1):
        super().__init__(cfg, causal)
        self.head_drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.d_model, n_tags, bias=not causal)
        self.apply(self._init)

    def forward(self, idx: torch.Tensor, segments: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> tag logits [B, T, n_tags]."""
        return self.classifier(self.head_drop(self.features(idx, segments=segments, pad_mask=pad_mask)))
