"""LoRA on a quantised frozen base (peft.base_dtype int8 / nf4, lmforge/quant.py): a quantised layer computes
what the fp32 one does within the format's rounding, LoRA's gradients on it are the fp32 base's, the base
really is held in 8 or 4 bits and keeps no dequantised copy for the backward pass, the import streams, a
run trains, saves, reloads, resumes exactly and exports the dequantised model transformers computes the
same logits with, and the mistakes are one line before anything is written.

The base is a tiny Llama-layout model that lmforge exports as a Hugging Face folder (no transformers
needed to make it); transformers reads the exports back as the oracle."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import GPU_TEST_DEVICE, finetune, make_base, read_metrics, sentences, write_lines
from lmforge import quant
from lmforge.cli import main
from lmforge.config import ConfigError, PeftConfig, load_config
from lmforge.hf.load import load_hf
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import GPT
from lmforge.peft import apply_peft, base_state_dict, lora_layers, merge_lora, strip_peft, unmerge_lora
from lmforge.runs import frozen_fingerprint, load_run

if importlib.util.find_spec("torchao") is None:  # not importorskip: lmforge imports it quietly, when it is needed
    pytest.skip("torchao is not installed (pip install 'lmforge[quant]')", allow_module_level=True)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "d_model": 64, "n_head": 4, "n_kv_head": 2,
         "max_seq_len": 64, "tie_embeddings": True}  # SmolLM2's layout, tiny
ALL_LINEARS = '["*.attn.qkv", "*.attn.proj", "*.mlp.up", "*.mlp.down"]'
# the largest rounding of one weight, as a share of its block's largest magnitude: int8 rounds to 1/127 of the
# row's absmax (half a step); NF4's widest gap between two of its 16 levels is 0.304 (-1 to -0.696), so half
# of it, plus a little for the double-quantised (8-bit) scales
ROUNDING = {"int8": 0.5 / 127 * 1.001, "nf4": 0.152 * 1.02}
# how close LoRA's gradients on a quantised base come to those on the fp32 base (cosine), on the 2-layer model
# below: int8 rounds each weight by under 1% (relative RMS 0.6%), so they agree to 1e-4; NF4's 4 bits round
# it by 9% (relative RMS 9.2% on Gaussian weights, as in the QLoRA paper's format), through both passes of
# every layer, and the gradients come out at cosine 0.980-0.992 (seeds 0-2): the format's own limit
GRAD_COSINE = {"int8": (0.999, 0.9995), "nf4": (0.97, 0.98)}  # (every LoRA tensor's, their mean)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A random Llama-layout model as a Hugging Face folder, written by lmforge's own export."""
    from lmforge.hf.export import export_hf

    tmp = tmp_path_factory.mktemp("quant-base")
    export_hf(make_base(tmp / "run", "clm", specials=SPECIALS, **LLAMA), tmp / "hf")
    return tmp / "hf"


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32, pos="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True)
    return GPT(cfg)


def lora(model, base_dtype: str = "none", **over):
    """The model with LoRA on every block Linear, its base quantised as asked, B made non-zero (so that A
    gets a gradient too)."""
    quant.quantise_model(model, base_dtype)
    apply_peft(model, PeftConfig(method="lora", lora_targets=["*.attn.*", "*.mlp.*"], base_dtype=base_dtype, **over))
    torch.manual_seed(7)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(std=0.02)
    return model


def clm_loss(model, seed: int = 1) -> torch.Tensor:
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(seed))
    idx = idx.to(model.tok_emb.weight.device)
    logits = model(idx)
    return F.cross_entropy(logits[:, :-1].reshape(-1, 96), idx[:, 1:].reshape(-1))


# -- the layer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_a_quantised_linear_computes_the_fp32_layer_within_the_formats_rounding(base_dtype):
    torch.manual_seed(0)
    w = torch.randn(128, 256) * 0.02
    x = torch.randn(8, 256)
    q = quant.quantise(w, base_dtype)
    error = (quant.dequantise(q) - w).abs()
    # each weight within half a quantisation step of its block's scale (int8: the row; nf4: 64 values)
    scale = w.abs().amax(dim=1, keepdim=True).expand_as(w) if base_dtype == "int8" else \
        w.reshape(-1, quant.NF4_BLOCK).abs().amax(dim=1, keepdim=True).expand(-1, quant.NF4_BLOCK).reshape(w.shape)
    assert (error <= ROUNDING[base_dtype] * scale + 1e-7).all(), (error / scale).max()
    # and so each output within the sum of those over its inputs; on the whole a small relative error
    y, ref = quant.linear(x, q), x @ w.T
    bound = x.abs() @ (ROUNDING[base_dtype] * scale).T + 1e-5
    assert ((y - ref).abs() <= bound).all()
    relative = ((y - ref).norm() / ref.norm()).item()
    assert relative < {"int8": 0.01, "nf4": 0.12}[base_dtype], relative
    torch.testing.assert_close(y, x @ quant.dequantise(q).T, atol=1e-5, rtol=1e-5)  # it is the dequantised layer


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_the_backward_pass_keeps_the_quantised_weight_not_a_dequantised_copy(base_dtype):
    """What autograd saves for a quantised layer is the input's gradient path only: no [out, in] float
    tensor (a dequantised copy per layer would be a full-precision base held through every step)."""
    torch.manual_seed(0)
    q = quant.quantise(torch.randn(128, 256) * 0.02, base_dtype)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = quant.linear(x, q, torch.zeros(128, requires_grad=True))
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 128 * 256 and not quant.is_quantised(t)]
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ quant.dequantise(q), atol=1e-5, rtol=1e-5)


def test_a_quantised_layer_computes_in_autocasts_dtype():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128) * 0.02, torch.randn(4, 128, requires_grad=True)
    q = quant.quantise(w, "int8")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quant.linear(x, q)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ quant.dequantise(q).T, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


# -- LoRA on a quantised base ------------------------------------------------------------------------------


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_lora_on_a_quantised_base_trains_like_on_the_fp32_base_and_the_base_stays_quantised(base_dtype):
    plain, quantised = lora(gpt()), lora(gpt(), base_dtype)
    clm_loss(plain).backward()
    clm_loss(quantised).backward()
    grads, cosines = dict(plain.named_parameters()), {}
    for name, p in quantised.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            cosines[name] = F.cosine_similarity(p.grad.flatten(), grads[name].grad.flatten(), dim=0).item()
        elif name.startswith("blocks.") and name.endswith(".weight") and p.dim() == 2:
            # the base: no gradient, and held in 8 or 4 bits (codes, plus per-row / per-block scales)
            assert not p.requires_grad and p.grad is None and quant.kind(p) == base_dtype, name
            inner = {k: getattr(p, k).dtype for k in p.__tensor_flatten__()[0]}
            assert torch.int8 in inner.values() if base_dtype == "int8" else torch.uint8 in inner.values(), inner
            ratio = quant.storage_bytes(p) / (p.numel() * 4)
            assert ratio < {"int8": 0.27, "nf4": 0.15}[base_dtype], (name, ratio)
        else:
            assert not quant.is_quantised(p), name  # embeddings (tied head), norms: as they were
    assert quantised.head.weight is quantised.tok_emb.weight
    every, mean = GRAD_COSINE[base_dtype]
    assert len(cosines) == 16 and min(cosines.values()) > every and sum(cosines.values()) / 16 > mean, cosines


def test_activation_checkpointing_recomputes_a_quantised_base_exactly():
    from lmforge.train.device import set_compiled

    plain, checkpointed = lora(gpt(), "int8"), lora(gpt(), "int8")
    set_compiled(checkpointed, False, checkpointed=True)
    clm_loss(plain).backward()
    clm_loss(checkpointed).backward()
    grads = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_merge_on_a_quantised_base_adds_to_the_dequantised_weight_and_unmerge_gives_it_back():
    model = lora(gpt(), "int8")
    idx = torch.randint(0, 96, (2, 10))
    layer = model.blocks[0].attn.qkv
    held = layer.weight
    fingerprint = frozen_fingerprint(model)
    with torch.no_grad():
        before = model(idx)
        merge_lora(model)
        assert not quant.is_quantised(layer.weight) and "quantised_base" not in dict(model.named_parameters())
        torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=1e-4)
        assert base_state_dict(model)["blocks.0.attn.qkv.weight"] is held  # the base, not the merged weight
        unmerge_lora(model)
    assert layer.weight is held and frozen_fingerprint(model) == fingerprint
    plain = strip_peft(model, merge=True)  # export's plain model: dequantised base plus the update
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), before, atol=1e-5, rtol=1e-4)
    assert not quant.quantised_layers(plain) and quant.quantised_layers(model)


# -- the import ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_the_import_streams_the_base_into_quantised_layers(hf_base, base_dtype, monkeypatch):
    """Every block Linear quantised as it is read, the rest as the plain import gives it, the head tied to
    the embedding again; safetensors tensors are read one at a time (Stored), each only when it is used."""
    from lmforge.hf import load as hf_load

    reads = []
    load = hf_load.Stored.load
    monkeypatch.setattr(hf_load.Stored, "load", lambda self: reads.append(self.shape) or load(self))
    plain, streamed = load_hf(hf_base).model, load_hf(hf_base, base_dtype=base_dtype).model
    assert len(reads) == len(hf_load._safetensors_index(hf_base / "model.safetensors", "test"))  # each once
    assert set(quant.quantised_layers(streamed)) == set(quant.targets(plain)) and quant.base_dtype_of(streamed) == base_dtype
    assert streamed.head.weight is streamed.tok_emb.weight
    for name, p in streamed.state_dict().items():
        if not quant.is_quantised(p):
            assert torch.equal(p, plain.state_dict()[name]), name
        else:
            torch.testing.assert_close(quant.dequantise(p), quant.dequantise(quant.quantise(plain.state_dict()[name],
                                                                                             base_dtype)))
    torch.testing.assert_close(streamed.rope_cos, plain.rope_cos)
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        error = ((streamed(idx) - plain(idx)).norm() / plain(idx).norm()).item()
    assert error < {"int8": 0.01, "nf4": 0.1}[base_dtype], error


def test_a_fresh_task_head_on_a_streamed_base_is_initialised_the_same_on_every_import(hf_base):
    from lmforge.tasks import make_task

    def head():
        cfg = load_config(base={"task": "classify", "finetune": {"init_from": str(hf_base), "labels": ["a", "b"],
                                                                  "body": "decoder", "pooling": "last"},
                                "peft": {"method": "lora", "base_dtype": "int8"}})
        task = make_task(cfg)
        task.labels = None
        model = load_hf(hf_base, build=task._adopt, base_dtype="int8").model
        return model.classifier.weight.detach().clone()

    first, second = head(), head()
    assert torch.equal(first, second) and 0.005 < first.std() < 0.05  # model._init's normal(0.02), not empty memory


# -- mistakes --------------------------------------------------------------------------------------------------


def sft_argv(tmp_path: Path, base: Path, *extra: str) -> list[str]:
    data = write_lines(tmp_path / "sft.jsonl", [json.dumps({"prompt": "the king", "response": " rome"})] * 8)
    return ["finetune", "--task", "sft", "--finetune.init_from", str(base), "--finetune.train", str(data),
            "--train.device", "cpu", "--log.run_dir", str(tmp_path / "run"), "--log.progress", "false", *extra]


def one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("options, expected", [
    (("--peft.base_dtype", "int8"), "config: peft.base_dtype = int8 needs peft.method = lora (it is none)"),
    (("--peft.method", "adapter", "--peft.base_dtype", "nf4"), "config: peft.base_dtype = nf4 needs peft.method = lora"),
    (("--peft.method", "lora", "--peft.base_dtype", "int4"), "peft.base_dtype"),
])
def test_base_dtype_without_lora_is_one_line_and_writes_nothing(tmp_path, capsys, hf_base, options, expected):
    assert expected in one_line(capsys, sft_argv(tmp_path, hf_base, *options))
    assert not (tmp_path / "run").exists()


def test_base_dtype_on_a_pretraining_task_is_a_config_error():
    with pytest.raises(ConfigError, match=r"peft\.base_dtype = int8: applies to fine-tuning"):
        load_config(base={"task": "clm", "peft": {"method": "lora", "base_dtype": "int8"}})


def test_nf4_where_no_kernel_runs_is_one_line_and_writes_nothing(tmp_path, capsys, hf_base, monkeypatch):
    monkeypatch.setattr(quant, "nf4_runs", lambda device: False)
    err = one_line(capsys, sft_argv(tmp_path, hf_base, "--peft.method", "lora", "--peft.base_dtype", "nf4"))
    assert "peft.base_dtype = nf4: no NF4 kernel runs on cpu" in err and "int8" in err
    assert not (tmp_path / "run").exists()


def test_missing_torchao_is_one_line_naming_the_extra(tmp_path, capsys, hf_base, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find(name, *a))
    err = one_line(capsys, sft_argv(tmp_path, hf_base, "--peft.method", "lora", "--peft.base_dtype", "int8"))
    assert "peft.base_dtype = int8 needs the torchao library" in err and "lmforge[quant]" in err
    assert not (tmp_path / "run").exists()


def test_torchrun_is_refused_in_one_line():
    from lmforge.train.distributed import Dist
    from lmforge.train.loop import check_base_dtype

    cfg = load_config(base={"task": "sft", "peft": {"method": "lora", "base_dtype": "int8"}})
    for parallel in ("ddp", "fsdp"):
        with pytest.raises(Exception, match=rf"peft.base_dtype = int8 trains in one process; under torchrun "
                                            rf"\(train.parallel = {parallel}\)"):
            check_base_dtype(cfg, Dist(world=2, parallel=parallel))
    check_base_dtype(cfg, Dist())  # one process: fine


@pytest.mark.slow  # two subprocesses importing torch
def test_plain_runs_do_not_import_torchao_and_a_quantised_one_imports_it_quietly():
    code = ("import sys, lmforge.cli, lmforge.train.loop, lmforge.runs, lmforge.hf.export, lmforge.peft; "
            "sys.exit('torchao' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    # torchao's import logs a line for each CUDA kernel library a CPU machine cannot load, and torch's pytree
    # a deprecation; lmforge's own import of it keeps both out of the run's output
    code = "import torch; from lmforge import quant; quant.check('nf4', torch.device('cpu')); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok" and done.stderr == "", done.stderr[-2000:]


# -- runs -----------------------------------------------------------------------------------------------------


def evaluate_loss(capsys, run: Path, data: Path) -> float:
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    return float(dict(kv.split("=") for kv in last.split()[1:])["loss"])


@pytest.mark.slow  # three short fine-tuning runs, an export and transformers
def test_an_int8_run_learns_reloads_resumes_exactly_and_exports_the_dequantised_model(tmp_path, hf_base, capsys):
    data = [{"prompt": " ".join(w) + " =>", "response": " " + w[0]} for w in sentences(80, 12)]
    train = write_lines(tmp_path / "sft.jsonl", [json.dumps(d) for d in data[:64]])
    dev = write_lines(tmp_path / "dev.jsonl", [json.dumps(d) for d in data[64:]])
    common = ("--peft.method", "lora", "--peft.base_dtype", "int8", "--peft.lora_targets", ALL_LINEARS,
              "--finetune.epochs", "3", "--train.lr", "1e-2", "--train.warmup_steps", "1", "--eval.every", "2",
              "--train.checkpoint_every", "3", "--train.precision", "fp32", "--peft.lora_dropout", "0.1")
    whole = finetune(tmp_path, hf_base, train, dev, "sft", *common, run="whole")
    assert "lmforge: peft.base_dtype int8: 8 frozen Linear weights of the blocks held in" in capsys.readouterr().out
    val = [r["loss"] for r in read_metrics(whole, "val")]
    assert min(val[1:]) < val[0] - 0.05, val  # it learns (an untrained LoRA scores about ln 300 = 5.7)

    # the run keeps the LoRA matrices only; loaded again (its base quantised again, the fingerprint the same)
    # it evaluates to the loss its training run reported on the same dev set
    report = json.loads((whole / "dev_report.json").read_text())
    assert evaluate_loss(capsys, whole, dev) == pytest.approx(report["loss"], abs=6e-5)  # RESULT prints 4 decimals
    model, _, cfg = load_run(whole)
    assert cfg.peft.base_dtype == "int8" and quant.base_dtype_of(model) == "int8"

    # resumed from its first checkpoint, the same losses and weights as the run that was never stopped
    part = finetune(tmp_path, hf_base, train, dev, "sft", *common, "--train.max_time", "1e-9", run="part")
    assert main(["finetune", "--resume", str(part), "--train.max_time", "0", "--log.progress", "false"]) == 0
    a, b = read_metrics(whole, "train"), read_metrics(part, "train")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    last = sorted((whole / "checkpoints").glob("step_*.pt"))[-1]
    wa, _, _ = load_run(last)
    wb, _, _ = load_run(part / "checkpoints" / last.name)
    for (name, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        if quant.is_quantised(x):
            assert torch.equal(quant.dequantise(x), quant.dequantise(y)), name
        else:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)

    # exported merged: a plain LlamaForCausalLM of the dequantised base plus the update, computing what
    # lmforge's run computes on its quantised base
    transformers = pytest.importorskip("transformers")
    assert main(["export", str(whole), str(tmp_path / "merged"), "--merge"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # a short fine-tuning run
def test_an_nf4_run_trains_and_reloads_on_the_cpu(tmp_path, hf_base, capsys):
    data = [{"prompt": " ".join(w) + " =>", "response": " " + w[0]} for w in sentences(40, 12)]
    train = write_lines(tmp_path / "sft.jsonl", [json.dumps(d) for d in data])
    run = finetune(tmp_path, hf_base, train, train, "sft", "--peft.method", "lora", "--peft.base_dtype", "nf4",
                   "--finetune.epochs", "1", "--train.warmup_steps", "0", "--train.precision", "fp32")
    report = json.loads((run / "dev_report.json").read_text())
    assert evaluate_loss(capsys, run, train) == pytest.approx(report["loss"], abs=6e-5)  # RESULT prints 4 decimals
    assert quant.base_dtype_of(load_run(run)[0]) == "nf4"


@pytest.mark.slow  # a short fine-tuning run
def test_a_run_directory_base_is_quantised_after_loading(tmp_path, hf_base, capsys):
    data = [{"prompt": " ".join(w) + " =>", "response": " " + w[0]} for w in sentences(40, 12)]
    train = write_lines(tmp_path / "sft.jsonl", [json.dumps(d) for d in data])
    base = hf_base.parent / "run"  # the lmforge run the folder was exported from
    run = finetune(tmp_path, base, train, train, "sft", "--peft.method", "lora", "--peft.base_dtype", "int8",
                   "--finetune.epochs", "1", "--train.warmup_steps", "0", "--train.precision", "fp32")
    report = json.loads((run / "dev_report.json").read_text())
    assert evaluate_loss(capsys, run, train) == pytest.approx(report["loss"], abs=6e-5)  # RESULT prints 4 decimals
    model = load_run(run)[0]
    assert set(quant.quantised_layers(model)) == set(quant.targets(model)) and quant.base_dtype_of(model) == "int8"


# -- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_quantised_lora_on_the_device_computes_what_it_computes_on_the_cpu(base_dtype):
    device = torch.device(GPU_TEST_DEVICE)
    cpu = lora(gpt(), base_dtype)
    dev = quant.to(lora(gpt(), base_dtype), device)
    assert quant.base_dtype_of(dev) == base_dtype and all(p.device.type == device.type for p in dev.parameters())
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(dev(idx.to(device)).cpu(), cpu(idx), atol=1e-4, rtol=1e-4)
    clm_loss(cpu).backward()
    clm_loss(dev).backward()
    grads = dict(cpu.named_parameters())
    for name, p in dev.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            torch.testing.assert_close(p.grad.cpu(), grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)
