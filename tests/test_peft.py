"""Parameter-efficient fine-tuning (lmforge.peft): LoRA merges to the same outputs and unmerges back,
adapters and LoRA start as the identity, prefix tuning works with padding and with a KV cache, frozen
weights stay bit-identical through training, adapters save and load by name, and an exported LoRA
adapter loads in Hugging Face peft with lmforge's outputs.

Every model is tiny (2 layers, width 32), seeded, fp32."""

from __future__ import annotations

import copy
import json
import re
import pytest
import torch

from helpers import synthetic_text
from lmforge.hf import arch as hf_arch
from lmforge.hf.export import export_hf, write_peft_adapter
from lmforge.config import PeftConfig, load_config, save_config
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import UserError
from lmforge.model.build import count_parameters, parameter_summary
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import GPT, MaskedLM
from lmforge.peft import (
    LoRALinear, adapter_state_dict, apply_peft, base_state_dict, inject_peft, load_adapter, lora_targets, merge_lora,
    peft_parameter_names, save_adapter, strip_peft, unmerge_lora,
)

ALL_LINEARS = ["*.attn.qkv", "*.attn.proj", "*.mlp.up", "*.mlp.down"]
V = 50


def perturb(model):
    """Noise well above the 0.02 init: attention far from uniform, biases and norm weights off 0 and 1,
    so that a wrong mask or a missing term shows in the outputs."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def gpt(**over) -> GPT:
    torch.manual_seed(0)
    return perturb(GPT(ModelConfig(**{**dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                            max_seq_len=16), **over})))


def bert(nsp: bool = True, **over) -> MaskedLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_seq_len=16, pos="learned", norm="layernorm",
               norm_position="post", bias=True, type_vocab_size=2, mlp="gelu")
    return perturb(MaskedLM(ModelConfig(**{**cfg, **over}), nsp=nsp))


def ids(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def nonzero_lora(model, seed: int = 3) -> None:
    """B = 0 at init makes every LoRA a no-op; noise on B (and A) makes the checks below mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def base_params(model) -> dict[str, torch.Tensor]:
    own = set(peft_parameter_names(model))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in own}


def train_steps(model, loss_fn, steps: int = 5, lr: float = 1e-2) -> list[float]:
    """AdamW with weight decay over *all* parameters: a frozen one changes only if it gets a gradient."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def clm_loss(model) -> torch.Tensor:
    x = ids(2, 12, seed=5)
    logits = model(x[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))


def mlm_loss(model) -> torch.Tensor:
    x = ids(2, 12, seed=5)
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, V), x.roll(1, 1).reshape(-1))


def one_line_error(fn, *needles) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# -- LoRA -------------------------------------------------------------------------------------------


def test_lora_merged_equals_unmerged_and_unmerge_restores_the_weight():
    model = gpt()
    inject_peft(model, PeftConfig(method="lora", lora_rank=4, lora_alpha=8.0, lora_targets=ALL_LINEARS))
    nonzero_lora(model)
    before = base_params(model)
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        qkv = model.blocks[0].attn.qkv
        assert qkv.merged and not torch.equal(qkv.weight, before["blocks.0.attn.qkv.weight"])
        merge_lora(model)  # a second merge adds nothing
        assert torch.allclose(model(x), merged, atol=1e-6)
        unmerge_lora(model)
        again = model(x)
    assert (merged - unmerged).abs().max() < 1e-5
    assert (again - unmerged).abs().max() < 1e-5
    for n, p in base_params(model).items():
        assert torch.allclose(p, before[n], atol=1e-6, rtol=0), n
    # the update is really there: the base model alone gives other logits
    with torch.no_grad():
        assert (strip_peft(model)(x) - unmerged).abs().max() > 1e-3
        assert torch.allclose(strip_peft(model, merge=True)(x), unmerged, atol=1e-5)


def test_lora_starts_as_identity_and_only_lora_and_head_train():
    plain = bert()
    model = bert()
    pc = PeftConfig(method="lora", lora_rank=4, lora_alpha=8.0)  # default targets: qkv and proj
    apply_peft(model, pc, trainable=("pooler", "nsp_head"))
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # B = 0
    assert isinstance(model.blocks[1].attn.qkv, LoRALinear) and not isinstance(model.blocks[1].mlp.up, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.attn.{m}.lora_{ab}" for i in range(2) for m in ("qkv", "proj") for ab in "AB"}
    expected |= {"pooler.weight", "pooler.bias", "nsp_head.weight", "nsp_head.bias"}
    assert trainable == expected
    d, r = 32, 4
    lora = 2 * (r * (d + 3 * d) + r * (d + d))  # per layer: qkv A [r, d], B [3d, r]; proj A [r, d], B [d, r]
    heads = (d * d + d) + (2 * d + 2)
    total = sum(p.numel() for p in plain.parameters()) + lora
    assert count_parameters(model) == (lora + heads, total)
    assert re.fullmatch(r"trainable \d+\.\d\dM of \d+\.\d\dM parameters \(\d+\.\d%\)", parameter_summary(model))
    assert parameter_summary(model).endswith(f"({100 * (lora + heads) / total:.1f}%)")
    # the state dict keeps every base key: the plain model's weights load into it with only LoRA missing
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(n for n in expected if "lora" in n) and not unexpected


def test_target_patterns_match_names_with_and_without_a_prefix_and_bad_targets_are_one_line():
    model = gpt(tie_embeddings=False)
    assert lora_targets(model, ["*.attn.qkv", "*.attn.proj"]) == [
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert lora_targets(model, ["*.head"]) == ["head"] == lora_targets(model, ["head"])  # "*." may be empty
    assert lora_targets(model, ["*.attn"]) == []  # Attention is no Linear
    wrapper = torch.nn.Module()
    wrapper.inner = model
    assert len(lora_targets(wrapper, ["*.attn.qkv", "*.mlp.down"])) == 4
    one_line_error(lambda: inject_peft(gpt(), PeftConfig(method="lora", lora_targets=["*.nothing"])),
                   "peft.lora_targets", "*.nothing", "blocks.0.attn.qkv")
    # a tied output layer: merging would change the token embedding too
    one_line_error(lambda: inject_peft(gpt(), PeftConfig(method="lora", lora_targets=["head"])), "head", "tok_emb")


def test_apply_peft_before_or_after_loading_base_weights():
    pretrained = bert()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    pc = PeftConfig(method="lora", lora_targets=ALL_LINEARS)
    after = copy.deepcopy(pretrained)
    apply_peft(after, pc)  # after loading: the base weights are kept as they are
    for n, p in base_params(after).items():
        assert torch.equal(p, dict(pretrained.named_parameters())[n]), n
    before = bert()
    apply_peft(before, pc)  # before loading: the base keys load into the peft model
    before.load_state_dict(pretrained.state_dict(), strict=False)
    x = ids()
    with torch.no_grad():
        assert torch.equal(before(x), pretrained(x)) and torch.equal(after(x), pretrained(x))
    # a saved LoRA model's whole state dict loads strictly into a fresh model with the structure
    nonzero_lora(after)
    fresh = bert()
    inject_peft(fresh, pc)
    fresh.load_state_dict(after.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), after(x))


# -- adapters ---------------------------------------------------------------------------------------


def test_adapters_start_as_identity_train_and_survive_a_copy():
    plain = gpt()
    model = gpt()
    apply_peft(model, PeftConfig(method="adapter", adapter_size=8))
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    names = set(model.state_dict())
    assert {"blocks.1.attn_adapter.down.weight", "blocks.1.attn_adapter.up.bias",
            "blocks.0.mlp_adapter.up.weight"} <= names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(peft_parameter_names(model))
    before = base_params(model)
    losses = train_steps(model, clm_loss, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in base_params(model).items():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        out = model(x)
        assert (out - plain(x)).abs().max() > 1e-3  # the adapters act
        clone = copy.deepcopy(model)  # the hooks follow the copied adapters
        assert torch.equal(clone(x), out)
        with torch.no_grad():
            clone.blocks[0].mlp_adapter.up.weight.zero_()
        assert not torch.equal(clone(x), out) and torch.equal(model(x), out)
        assert torch.equal(strip_peft(model)(x), plain(x))


# -- prefix tuning ----------------------------------------------------------------------------------


def test_prefix_changes_outputs_and_training_touches_only_the_prefix():
    plain = gpt()
    model = gpt()
    apply_peft(model, PeftConfig(method="prefix", prefix_length=3))
    assert model.blocks[0].attn.prefix.shape == (2, 2, 3, 8)  # (k, v), n_kv_head, P, head_dim
    assert peft_parameter_names(model) == ["blocks.0.attn.prefix", "blocks.1.attn.prefix"]
    x = ids()
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max() > 1e-3
    before = base_params(model)
    prefix0 = model.blocks[0].attn.prefix.detach().clone()
    losses = train_steps(model, clm_loss, steps=5)
    assert losses[-1] < losses[0], losses
    for n, p in base_params(model).items():
        assert torch.equal(p, before[n]), n
    assert not torch.equal(model.blocks[0].attn.prefix, prefix0)
    with torch.no_grad():
        assert torch.equal(strip_peft(model)(x), plain(x))


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_prefix_with_padding_gives_each_sequence_its_own_outputs(kind):
    model = bert() if kind == "bert" else gpt()
    apply_peft(model, PeftConfig(method="prefix", prefix_length=4))
    x = ids(2, 10)
    mask = torch.arange(10)[None] < torch.tensor([10, 6])[:, None]
    with torch.no_grad():
        both = model.features(x.masked_fill(~mask, 0), pad_mask=mask)
        alone = model.features(x[1:, :6])
        alone_masked = model.features(x[1:, :6], pad_mask=mask[1:, :6])
    assert (both[1, :6] - alone[0]).abs().max() < 1e-5
    assert (alone_masked - alone).abs().max() < 1e-6
    if kind == "gpt":  # causal: a position does not see later ones, padding or not
        with torch.no_grad():
            head = model.features(x[:1, :7])
        assert (both[0, :7] - head[0]).abs().max() < 1e-5


def test_causal_attention_given_a_padding_mask_stays_causal():
    # Transformer.features passes no padding mask to a causal stack (padding is on the right); an
    # Attention called with one must still not let a position see later ones
    attn = gpt().blocks[0].attn
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(4))
    mask = (torch.arange(10)[None] < torch.tensor([10, 6])[:, None])[:, None, None, :]
    with torch.no_grad():
        plain, masked = attn(x), attn(x, mask=mask)
    assert (masked[0] - plain[0]).abs().max() < 1e-5
    assert (masked[1, :6] - plain[1, :6]).abs().max() < 1e-5


@pytest.mark.parametrize("over", [dict(), dict(pos="learned", n_kv_head=4)])
def test_prefix_with_kv_cache_equals_the_full_sequence(over):
    model = gpt(**over)
    apply_peft(model, PeftConfig(method="prefix", prefix_length=5))
    x = ids(2, 12)
    with torch.no_grad():
        full = model(x)
        caches = model.new_caches(2)
        steps = [model(x[:, :4], caches), model(x[:, 4:7], caches)]  # a prompt, then a chunk after the cache
        steps += [model(x[:, t:t + 1], caches) for t in range(7, 12)]  # then one token at a time
    assert caches[0].length == 12  # the prefix is not stored in the cache
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


# -- freezing ---------------------------------------------------------------------------------------


def test_frozen_embeddings_and_bottom_layers_get_no_gradient_and_do_not_change():
    model = bert(nsp=False)  # every parameter is in the masked-LM loss
    apply_peft(model, PeftConfig(freeze_embeddings=True, freeze_layers=1))
    frozen = ("tok_emb.", "pos_emb.", "seg_emb.", "emb_norm.", "blocks.0.")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mlm_loss(model).backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == n.startswith(frozen), n
    train_steps(model, mlm_loss, steps=3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith(frozen), n
    # with LoRA, freeze_layers freezes the bottom blocks' LoRA too
    lora = bert()
    apply_peft(lora, PeftConfig(method="lora", freeze_layers=1), trainable=())
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {
        f"blocks.1.attn.{m}.lora_{ab}" for m in ("qkv", "proj") for ab in "AB"}
    one_line_error(lambda: apply_peft(bert(), PeftConfig(freeze_layers=3)), "peft.freeze_layers = 3", "2 blocks")


# -- saving and loading -----------------------------------------------------------------------------


def test_save_and_load_adapter_round_trip_and_mismatches_are_one_line(tmp_path):
    pc = PeftConfig(method="lora", lora_rank=4, lora_targets=ALL_LINEARS)
    model = bert()
    apply_peft(model, pc, trainable=("nsp_head",))
    nonzero_lora(model)
    train_steps(model, mlm_loss, steps=2)  # the head changes too
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    from safetensors.torch import load_file
    saved = load_file(str(path))
    assert set(saved) == set(adapter_state_dict(model)) == set(peft_parameter_names(model)) | {
        "nsp_head.weight", "nsp_head.bias"}
    fresh = bert()
    apply_peft(fresh, pc, trainable=("nsp_head",))
    x = ids()
    with torch.no_grad():
        assert not torch.allclose(fresh.nsp_head(fresh.pooled(fresh.features(x))),
                                  model.nsp_head(model.pooled(model.features(x))))
        merge_lora(fresh)  # loading into a merged model unmerges, loads, merges again
        load_adapter(fresh, path)
        assert fresh.blocks[0].attn.qkv.merged
        assert (fresh(x) - model(x)).abs().max() < 1e-5
        exact = bert()
        inject_peft(exact, pc)
        load_adapter(exact, path)
        assert torch.equal(exact(x), model(x))  # base weights as built, the trained ones as saved

    other_rank = bert()
    inject_peft(other_rank, PeftConfig(method="lora", lora_rank=2, lora_targets=ALL_LINEARS))
    one_line_error(lambda: load_adapter(other_rank, path), str(path), "blocks.0.attn.qkv.lora_A", "(4, 32)", "(2, 32)")
    prefix = bert()
    inject_peft(prefix, PeftConfig(method="prefix"))
    one_line_error(lambda: load_adapter(prefix, path), str(path), "no place", "prefix")
    fewer = bert()
    inject_peft(fewer, PeftConfig(method="lora", lora_rank=4, lora_targets=ALL_LINEARS + ["mlm_head.dense"]))
    one_line_error(lambda: load_adapter(fewer, path), "lacks the model's mlm_head.dense.lora_A")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    one_line_error(lambda: load_adapter(fewer, tmp_path / "bad.safetensors"), "bad.safetensors", "cannot be read")


def test_base_state_dict_is_the_plain_model_merged_or_not():
    plain = gpt()
    model = gpt()
    inject_peft(model, PeftConfig(method="lora", lora_targets=ALL_LINEARS))
    nonzero_lora(model)
    merge_lora(model)
    state = base_state_dict(model)
    assert set(state) == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.allclose(state[k], v, atol=1e-6, rtol=0), k
    stripped = strip_peft(model)
    assert not any(isinstance(m, LoRALinear) for m in stripped.modules()) and model.blocks[0].attn.qkv.merged
    assert stripped.head.weight is stripped.tok_emb.weight  # ties survive the copy
    plain.load_state_dict(stripped.state_dict())  # strict


# -- Hugging Face peft ------------------------------------------------------------------------------

SMALL = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=32)
# name -> (task, model options, the HF arch, lora targets)
EXPORTS = {
    "bert": ("mlm", dict(pos="learned", norm="layernorm", norm_position="post", bias=True, type_vocab_size=2,
                         norm_eps=1e-12, mlp="gelu"), hf_arch.BERT, ALL_LINEARS + ["mlm_head.dense"]),
    "llama-gqa": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False), hf_arch.LLAMA,
                  ALL_LINEARS),
    "gpt2": ("clm", dict(pos="learned", norm="layernorm", bias=True, mlp="gelu_tanh"), hf_arch.GPT2, ALL_LINEARS),
    # a LoRA on the fused qkv whose bias splits into q_proj's, k_proj's and v_proj's
    "qwen2": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qkv_bias=True), hf_arch.QWEN2,
              ALL_LINEARS),
    "qwen3": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True), hf_arch.QWEN3,
              ALL_LINEARS),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_exported_lora_adapter_loads_in_peft_with_lmforge_outputs(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.tasks import make_task
    from lmforge.io import save_weights
    from lmforge.runs import WEIGHTS
    from lmforge.train.distributed import Dist, full_weights

    transformers.logging.set_verbosity_error()
    task, options, arch, targets = EXPORTS[name]
    kind = "wordpiece" if task == "mlm" else "bpe"
    tok = train_tokenizer(synthetic_text(3000).splitlines(), kind, 120, [] if task == "mlm" else ["<|endoftext|>"])
    cfg = load_config(base={"task": task, "model": {**SMALL, **options, "vocab_size": tok.get_vocab_size()},
                            "data": {"tokenizer": {"kind": kind}}})
    torch.manual_seed(0)
    lm = make_task(cfg).build_model().eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # biases and norm weights off their init values too
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    apply_peft(lm, PeftConfig(method="lora", lora_rank=4, lora_alpha=6.0, lora_targets=targets))
    nonzero_lora(lm)

    # the base folder as export_hf writes it from the stripped model's weights, then the adapter beside it
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_weights(full_weights(Dist(), strip_peft(lm)), run / WEIGHTS, {"step": "0"})
    tok.save(str(run / "tokenizer.json"))
    hf_cfg = export_hf(run, tmp_path / "hf")
    config = write_peft_adapter(lm, arch, tmp_path / "adapter", base_model_path=str(tmp_path / "hf"),
                                hf_class=hf_cfg["architectures"][0])
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written == config and written["r"] == 4 and written["lora_alpha"] == 6.0
    assert written["fan_in_fan_out"] == (name == "gpt2")
    assert written["task_type"] == (None if task == "mlm" else "CAUSAL_LM")
    per_layer = {"bert": 6, "llama-gqa": 7, "gpt2": 4, "qwen2": 7, "qwen3": 7}[name]  # HF layers: q, k, v / gate, up split out
    assert len(written["target_modules"]) == 2 * per_layer + (name == "bert")

    auto = transformers.AutoModelForMaskedLM if task == "mlm" else transformers.AutoModelForCausalLM
    base = auto.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    # every LoRA tensor was read: none is left at peft's init (B = 0)
    loaded = {k: v for k, v in model.state_dict().items() if ".lora_B." in k}
    assert len(loaded) == len(written["target_modules"]) and all(v.abs().sum() > 0 for v in loaded.values())
    x = torch.randint(5, tok.get_vocab_size(), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = lm(x)
        theirs = model(input_ids=x).logits
        with model.disable_adapter():  # the adapter matters
            assert (ours - model(input_ids=x).logits).abs().max() > 1e-3
        assert (ours - theirs).abs().max() < 1e-5
        # AutoPeftModel finds the base through base_model_name_or_path (and auto_mapping for BERT)
        auto_peft = peft.AutoPeftModelForCausalLM if task == "clm" else peft.AutoPeftModel
        again = auto_peft.from_pretrained(tmp_path / "adapter", local_files_only=True).eval()
        assert (again(input_ids=x).logits - ours).abs().max() < 1e-5


def test_peft_export_refuses_models_it_cannot_write(tmp_path):
    one_line_error(lambda: write_peft_adapter(gpt(), hf_arch.LLAMA, tmp_path / "a"), "no LoRA layers")
    model = gpt(pos="learned", norm="layernorm", bias=True, mlp="gelu_tanh", n_kv_head=4, tie_embeddings=False)
    inject_peft(model, PeftConfig(method="lora", lora_targets=["*.attn.qkv", "head"]))
    one_line_error(lambda: write_peft_adapter(model, hf_arch.GPT2, tmp_path / "a"), "Conv1D", "lm_head")
    both = gpt()
    inject_peft(both, PeftConfig(method="lora"))
    inject_peft(both, PeftConfig(method="prefix"))
    one_line_error(lambda: write_peft_adapter(both, hf_arch.LLAMA, tmp_path / "a"), "prefix")
    assert not (tmp_path / "a").exists()
