"""The GPT model: sizes, causality, grouped-query attention, weight tying, initialisation, dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_config
from lmforge.model.config import PRESETS, ModelConfig
from lmforge.model.transformer import GPT


def expected_params(c: ModelConfig) -> int:
    """Parameter count from the architecture, written out layer by layer."""
    d, hd, b = c.d_model, c.head_dim, int(c.bias)
    qkv_out = (c.n_head + 2 * c.n_kv_head) * hd
    attn = d * qkv_out + b * qkv_out + c.n_head * hd * d + b * d + 2 * hd * c.qk_norm
    up_out = c.d_ff * (2 if c.mlp == "swiglu" else 1)
    mlp = d * up_out + b * up_out + c.d_ff * d + b * d
    norm = d + (b * d if c.norm == "layernorm" else 0)
    total = c.n_layer * (attn + mlp + 2 * norm) + norm + c.vocab_size * d
    if c.pos == "learned":
        total += c.max_seq_len * d
    if not c.tie_embeddings:
        total += c.vocab_size * d
    return total


def preset(name: str, **extra) -> ModelConfig:
    over = {"model.preset": name, **{f"model.{k}": v for k, v in extra.items()}}
    return load_config(overrides=over).model


def test_char_tiny_parameter_count():
    cfg = preset("char-tiny", vocab_size=65, pos="learned", norm="layernorm", bias=True, mlp="gelu")  # nanoGPT's layout
    model = GPT(cfg)
    # 4 blocks of 198,272 + 65*128 token + 64*128 position embeddings + the final LayerNorm's 256
    assert model.num_params() == 809_856 == expected_params(cfg)
    assert model.num_params() == pytest.approx(0.8e6, rel=0.02)


def test_gpt2_small_parameter_count():
    cfg = preset("gpt2-small")
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.mlp, cfg.tie_embeddings) == (50257, 1024, "gelu_tanh", True)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 124_439_808 == expected_params(cfg)  # GPT-2 small as published


@pytest.mark.parametrize("extra", [dict(), dict(pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False,
                                                tie_embeddings=False), dict(head_dim=24, bias=True),
                                   dict(qk_norm=True, head_dim=12)])
def test_parameter_count_formula_for_other_shapes(extra):
    cfg = ModelConfig(vocab_size=77, max_seq_len=32, n_layer=3, n_head=4, d_model=64, **extra)
    assert GPT(cfg).num_params() == expected_params(cfg)


def test_presets_are_valid_model_configs():
    for name in PRESETS:
        cfg = preset(name, vocab_size=100)
        assert cfg.d_model % cfg.n_head == 0


@pytest.mark.parametrize("extra", [dict(pos="learned"), dict(pos="rope", n_kv_head=1, norm="rmsnorm", mlp="swiglu")])
def test_causal_later_tokens_do_not_change_earlier_logits(extra):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, max_seq_len=24, n_layer=2, n_head=4, d_model=32, init_std=0.2, **extra)).eval()
    idx = torch.randint(40, (2, 24))
    changed = idx.clone()
    changed[:, 15] = (idx[:, 15] + 7) % 40
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :15], b[:, :15])
    assert (a[:, 15:] - b[:, 15:]).abs().amax(-1).min() > 1e-4  # position 15 onwards sees the change


def reference_attention(attn, x):
    """Grouped-query causal attention written out: each group of n_head / n_kv_head query heads
    shares one key/value head."""
    B, T, d = x.shape
    h, kv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.qkv(x).split([h * hd, kv * hd, kv * hd], dim=-1)
    q = q.view(B, T, h, hd).transpose(1, 2)
    k = k.view(B, T, kv, hd).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    v = v.view(B, T, kv, hd).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, h * hd)
    return attn.proj(y)


@pytest.mark.parametrize("n_kv_head, head_dim", [(1, 0), (2, 0), (4, 0), (2, 12)])
def test_grouped_query_attention_shapes_and_values(n_kv_head, head_dim):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, max_seq_len=16, n_layer=1, n_head=4, d_model=32, n_kv_head=n_kv_head,
                      head_dim=head_dim, init_std=0.2)
    model = GPT(cfg).eval()
    attn = model.blocks[0].attn
    hd = head_dim or 8  # 0: d_model / n_head
    assert attn.qkv.weight.shape == ((4 + 2 * n_kv_head) * hd, 32) and attn.proj.weight.shape == (32, 4 * hd)
    assert model.new_caches(3)[0].k.shape == (3, n_kv_head, 16, hd)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_one_tensor():
    tied = GPT(ModelConfig(vocab_size=40, max_seq_len=16, n_layer=1, n_head=2, d_model=32, tie_embeddings=True))
    assert tied.head.weight is tied.tok_emb.weight
    opt = torch.optim.SGD(tied.parameters(), lr=1.0)
    tied(torch.randint(40, (2, 16))).square().mean().backward()
    opt.step()
    assert tied.head.weight is tied.tok_emb.weight and torch.equal(tied.head.weight, tied.tok_emb.weight)
    assert sum(p.numel() for p in tied.parameters()) == tied.num_params()
    assert len({p.data_ptr() for p in tied.parameters()}) == len(list(tied.parameters()))

    untied = GPT(ModelConfig(vocab_size=40, max_seq_len=16, n_layer=1, n_head=2, d_model=32, tie_embeddings=False))
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.num_params() == tied.num_params() + 40 * 32


@pytest.mark.parametrize("depth_scaled", [True, False])
def test_depth_scaled_init_std(depth_scaled):
    torch.manual_seed(0)
    n_layer, std = 8, 0.02
    model = GPT(ModelConfig(vocab_size=512, max_seq_len=64, n_layer=n_layer, n_head=4, d_model=256, init_std=std,
                            depth_scaled_init=depth_scaled, pos="learned", norm="layernorm", bias=True))
    residual = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.down.weight.flatten()]) for b in model.blocks])
    other = torch.cat([torch.cat([b.attn.qkv.weight.flatten(), b.mlp.up.weight.flatten()]) for b in model.blocks])
    want = std / math.sqrt(2 * n_layer) if depth_scaled else std
    assert residual.std().item() == pytest.approx(want, rel=0.02)
    assert residual.mean().item() == pytest.approx(0.0, abs=want / 100)
    assert other.std().item() == pytest.approx(std, rel=0.02)
    assert model.tok_emb.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.pos_emb.weight.std().item() == pytest.approx(std, rel=0.05)
    for b in model.blocks:
        for lin in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down):
            assert torch.count_nonzero(lin.bias) == 0
        assert torch.equal(b.norm1.weight, torch.ones(256))


def test_dropout_only_in_training():
    cfg = dict(vocab_size=40, max_seq_len=16, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    noisy = GPT(ModelConfig(**cfg, dropout=0.5))
    clean = GPT(ModelConfig(**cfg, dropout=0.0))
    clean.load_state_dict(noisy.state_dict())
    idx = torch.randint(40, (2, 16))
    with torch.no_grad():
        noisy.eval()
        clean.eval()
        assert torch.equal(noisy(idx), clean(idx))
        assert torch.equal(noisy(idx), noisy(idx))
        noisy.train()
        a, b = noisy(idx), noisy(idx)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, clean(idx).detach())


def test_context_overflow_is_rejected():
    model = GPT(ModelConfig(vocab_size=40, max_seq_len=16, n_layer=1, n_head=2, d_model=32))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError):
        GPT(ModelConfig(vocab_size=0))


def test_model_cross_entropy_matches_functional():
    """The task's summed loss is F.cross_entropy over real targets (the oracle written independently)."""
    from lmforge.losses import IGNORE_INDEX
    from lmforge.tasks.clm import CausalLM

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, max_seq_len=16, n_layer=1, n_head=2, d_model=32, init_std=0.2))
    batch = {"input": torch.randint(40, (3, 16)), "target": torch.randint(40, (3, 16))}
    batch["target"][0, :5] = IGNORE_INDEX
    from lmforge.config import Config

    task = CausalLM(Config())
    got = task.loss(model, batch)
    logits = model(batch["input"])
    logp = F.log_softmax(logits, -1)
    real = batch["target"] != IGNORE_INDEX
    want = -logp[real, batch["target"][real]].sum()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    assert task.count(batch) == 3 * 16 - 5
