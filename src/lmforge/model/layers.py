"""The pieces every Transformer stack here is built from: norms, rotary positions, attention with a
KV cache, and MLPs. Encoder, decoder and encoder-decoder stacks share them instead of copying them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# -- rotary position embedding (RoFormer, Su et al. 2021) -------------------------------------------
# The "rotate half" layout (first half of each head pairs with the second half), as Llama checkpoints
# use it, so that imported weights need no permutation.


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The rotary frequencies theta^(-2i/head_dim), i < head_dim / 2, in float64 on the CPU, scaled as
    model.rope_scaling says."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)
    return llama3_scaled(inv_freq, cfg) if cfg.rope_scaling == "llama3" else inv_freq


def llama3_scaled(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's RoPE scaling (Meta's Llama 3 release; rope_type llama3 in transformers). With
    n = the original context / a frequency's wavelength: n below rope_low_freq_factor (the long
    wavelengths, which saw few whole turns in training) is divided by rope_factor, n above
    rope_high_freq_factor (the short ones that carry local order) is kept, and between the two the
    factor blends linearly in n. The same piecewise formula as the release, written as one clamp."""
    turns = cfg.rope_original_max_len * inv_freq / (2 * math.pi)
    keep = ((turns - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)).clamp(0, 1)
    return inv_freq * (keep + (1 - keep) / cfg.rope_factor)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_seq_len, head_dim], computed in float64 on the CPU (MPS has no float64; fp32 angles
    lose digits at long positions), returned in fp32 on the default device (a model built under
    `with torch.device(...)` gets them there; otherwise `.to(device)` moves them with the model)."""
    positions = torch.arange(cfg.max_seq_len, dtype=torch.float64, device="cpu")
    angles = torch.outer(positions, rope_inv_freq(cfg))
    angles = torch.cat([angles, angles], dim=-1)
    device = torch.get_default_device()
    return angles.cos().to(device, torch.float32), angles.sin().to(device, torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D] for the positions of x."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated to max_len."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.length + t > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {self.length + t} requested")
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v
        self.length += t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows at `index` (may repeat rows): beam search follows each surviving hypothesis
        back to the row it extends and drops finished sentences. The cached length is unchanged."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads through F.scaled_dot_product_attention.

    `extend_keys` is the one hook for keys and values every query sees besides the sequence's own (peft's
    prefix tuning overrides it); `extra_keys` says how many it adds."""

    extra_keys = 0

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.causal = causal
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        # n_head * head_dim is d_model unless the config gives head_dim (Qwen3, Gemma)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.proj.residual_out = True  # depth-scaled init
        self.resid_drop = nn.Dropout(cfg.dropout)
        # Qwen3 normalises each head's queries and keys (one weight over head_dim, shared by the heads)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d]. rope: (cos, sin) for these T positions. mask: bool [B, 1, T, S], True = attend."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        if self.causal and T > 1 and (past > 0 or mask is not None or self.extra_keys):
            # an explicit causal mask, offset by the cached positions: a chunk after a cache, a padding
            # mask (which must not lift causality) or extra keys (their columns come first)
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            mask = causal if mask is None else mask & causal
        # bool(): traced for ONNX (hf/onnx.py) T is a symbolic size, whose comparison SDPA refuses; the
        # trace takes T > 1, and SDPA's causal mask of one position is that position, as without it
        is_causal = self.causal and mask is None and past == 0 and bool(T > 1)
        k, v, mask = self.extend_keys(k, v, mask)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_drop(self.proj(y))

    def extend_keys(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """Keys [B, kv_heads, S, D], values and the mask [.., T, S] after RoPE and the KV cache, with any
        extra positions put first (`extra_keys` of them); none here."""
        return k, v, mask


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention: queries from the decoder, keys and values from the encoder's output
    (its memory). The keys and values depend only on the source, so `memory_kv` computes them once and
    every decoding step reuses them: the cross-attention KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_head * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.proj.residual_out = True
        self.resid_drop = nn.Dropout(cfg.dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output [B, S, d] -> keys and values [B, n_kv_head, S, head_dim] each."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor],
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d]; memory_mask: bool [B, S], True at real source tokens."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = memory_kv
        mask = memory_mask[:, None, None, :] if memory_mask is not None else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)))


def activation(name: str):
    """The elementwise function of an MLP kind (swiglu's gate uses SiLU)."""
    return {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "swiglu": F.silu}[name]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, cfg.d_ff * (2 if self.gated else 1), bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.down.residual_out = True
        self.act = activation(cfg.mlp)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, h = h.chunk(2, dim=-1)
            h = self.act(gate) * h
        else:
            h = self.act(h)
        return self.drop(self.down(h))


class Block(nn.Module):
    """A Transformer block. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). Post-norm (BERT):
    norm(x + attn(x)), then norm(x + mlp(x)). A decoder block of an encoder-decoder (cross=True) has a
    cross-attention sublayer between the two, normed the same way."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, causal)
        self.norm_cross = make_norm(cfg) if cross else None
        self.cross = CrossAttention(cfg) if cross else None
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None, mask=None, memory=None):
        """memory: (keys and values from CrossAttention.memory_kv, source mask or None), cross blocks only."""
        if self.post_norm:
            x = self.norm1(x + self.attn(x, rope, cache, mask))
            if self.cross is not None:
                x = self.norm_cross(x + self.cross(x, *memory))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), rope, cache, mask)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), *memory)
        return x + self.mlp(self.norm2(x))
