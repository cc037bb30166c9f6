"""GPU pre-training throughput, memory and MFU: lmforge's GPT against transformers' GPT2LMHeadModel (SDPA),
each eager and under torch.compile.

All five variants have GPT-2 small's shape (12 layers, width 768, 12 heads, context 1024, vocabulary
50,304, GPT-2's tanh GELU, biases, tied embeddings, dropout 0), see the same random batches (16 x 1024)
under bf16 autocast and take fused AdamW steps: lmforge through its causal-LM task's loss (the chunked
fused output projection + cross-entropy, summed and divided by the targets as the training loop does)
and its optimizer factory, transformers with `labels=` and torch.optim.AdamW(fused=True). Compiled:
lmforge as `train.compile` does it (`set_compiled`: each Block's forward, regionally), transformers as
torch.compile(model). Neither side clips gradients or reads the loss back (a host sync). Steps are
interleaved in one process (A B C D E A B C D E ...), each timed between torch.cuda.synchronize() calls;
warm-up steps (where compilation happens) are not counted and the medians of the steady steps are
compared.

Memory: the five models stay resident together (their steps are interleaved, and building each alone
again would mean compiling it twice), so a variant's peak is counted in two parts: its own weights and
optimizer state, summed exactly from their tensors, plus the highest rise of max_memory_allocated()
over the memory allocated just before one of its measured steps (the peak statistics are reset before
every step): activations, gradients, the loss and the optimizer's temporaries. The other models'
weights and states sit in that baseline, so they are counted out; what outlives a step without
belonging to any model (the batches, cuBLAS workspaces) is counted for none. Allocated bytes, not
reserved ones: the caching allocator's spare blocks are not counted.

MFU: lmforge's training FLOPs per token (the task's `flops_per_token`: 6 per matmul weight plus
attention, PaLM appendix B) times the tokens/s of lmforge's faster variant (named in the output) over
the device's dense bf16 peak (`lmforge.train.perf.peak_flops`).

A fifth variant, lmforge eager with the unfused loss (`loss.chunked false`: the whole logits, then
cross-entropy), is the peer of the fused loss: on CUDA it must cost no more step time, with less memory.

Goals (on an H100): lmforge eager >= 1.3x transformers eager tokens/s, lmforge compiled >= 1.1x
transformers compiled, lmforge eager memory <= 0.5x transformers eager, MFU >= 0.45, fused loss step
time <= 1.0x the unfused.
Last line: RESULT tok_s_ratio_eager=... tok_s_ratio_compiled=... mem_ratio=... mfu=... fused_step_ratio=...
fused_mem_ratio=...

Needs a CUDA device: without one it says so in one line and exits 2. --smoke checks the script's logic
on any device, the CPU included: a tiny shape (2 layers, width 64, context 64, batch 2, vocabulary 512),
2 steps after 1 warm-up, no compilation unless --compile-smoke, goals printed but not judged; on a CPU,
where torch keeps no allocator statistics, memory is reported as nan.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmforge.config import Config, TrainConfig  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import GPT  # noqa: E402
from lmforge.optim import build_optimizer  # noqa: E402
from lmforge.tasks.clm import CausalLM  # noqa: E402
from lmforge.train.device import set_compiled  # noqa: E402
from lmforge.train.perf import peak_flops  # noqa: E402


class Shape(NamedTuple):
    vocab: int
    layers: int
    width: int
    heads: int
    context: int
    batch: int


FULL = Shape(vocab=50304, layers=12, width=768, heads=12, context=1024, batch=16)
SMOKE = Shape(vocab=512, layers=2, width=64, heads=4, context=64, batch=2)
TRAIN = TrainConfig(lr=3e-4, weight_decay=0.1)  # AdamW's settings, shared by both sides
NO_CUDA = "gpu_throughput: no CUDA device here; this benchmark needs one (see ../shared/gpu/README.md)"


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[torch.Tensor], None]
    times: list[float] = field(default_factory=list)
    rise: int = 0  # the highest allocation above the pre-step baseline over the measured steps


def autocast_on(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lmforge_variant(name: str, shape: Shape, device: torch.device, compiled: bool, fused: bool = True) -> Variant:
    torch.manual_seed(0)  # both lmforge variants start from the same weights
    cfg = ModelConfig(vocab_size=shape.vocab, n_layer=shape.layers, n_head=shape.heads, d_model=shape.width,
                      max_seq_len=shape.context, pos="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                      tie_embeddings=True, dropout=0.0)
    with device:  # initialised where it trains: no host-side init and copy of 124M weights
        model = GPT(cfg).train()
    if compiled:
        set_compiled(model, True)
    opt = build_optimizer(model, TRAIN)
    cfg = Config()
    cfg.loss.chunked = fused  # False: logits + cross-entropy, the peer the fused loss must not be slower than
    task = CausalLM(cfg)  # its loss needs only the config's loss section, no data

    def step(tokens: torch.Tensor) -> None:
        x, y = tokens[:, :-1], tokens[:, 1:]
        with autocast_on(device):
            # the task's loss is a sum; the training loop divides it by the targets, so does this
            loss = task.loss(model, {"input": x, "target": y}) / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Variant(name, model, opt, step)


def hf_variant(name: str, shape: Shape, device: torch.device, compiled: bool) -> Variant:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=shape.vocab, n_positions=shape.context, n_embd=shape.width, n_layer=shape.layers,
                     n_head=shape.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     # GPT-2's end-of-text id, inside the smoke vocabulary too (transformers warns otherwise)
                     bos_token_id=min(50256, shape.vocab - 1), eos_token_id=min(50256, shape.vocab - 1))
    with device:
        model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN.lr, betas=(TRAIN.beta1, TRAIN.beta2), eps=TRAIN.eps,
                            weight_decay=TRAIN.weight_decay, fused=True)
    run = torch.compile(model) if compiled else model

    def step(tokens: torch.Tensor) -> None:
        x = tokens[:, :-1]  # transformers shifts the labels itself
        with autocast_on(device):
            loss = run(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Variant(name, model, opt, step)


def resident_bytes(v: Variant) -> int:
    """Weights and optimizer state, each tensor once (a tied head is the embedding)."""
    state = [t for s in v.opt.state.values() for t in s.values() if torch.is_tensor(t)]
    unique = {id(t): t for t in [*v.model.parameters(), *state]}
    return sum(t.numel() * t.element_size() for t in unique.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(v: Variant, tokens: torch.Tensor, device: torch.device, measured: bool) -> None:
    cuda = device.type == "cuda"
    sync(device)  # no queued work of the previous variant may land in this one's time
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    v.step(tokens)
    sync(device)
    elapsed = time.perf_counter() - t
    if measured:
        v.times.append(elapsed)
        if cuda:
            v.rise = max(v.rise, torch.cuda.max_memory_allocated(device) - before)


def peak_gb(v: Variant, device: torch.device) -> float:
    return (resident_bytes(v) + v.rise) / 1e9 if device.type == "cuda" else float("nan")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="measured steps per variant after warm-up (default 20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="uncounted steps per variant first, compilation among them "
                    "(default 5; smoke 1)")
    ap.add_argument("--smoke", action="store_true", help="check the script's logic on any device: a tiny shape, "
                    "2 steps, no compilation, goals not judged")
    ap.add_argument("--compile-smoke", action="store_true", help="with --smoke: compile the compiled variants too")
    ap.add_argument("--device", default="cuda", help="cuda (or cuda:N); cpu only with --smoke")
    args = ap.parse_args()
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    if not args.smoke and torch.device(args.device).type != "cuda":
        ap.error("--device must be a CUDA device outside --smoke")
    if not args.smoke and args.steps < 10:
        ap.error("--steps must be at least 10: a median of fewer steady steps is noise")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def build_variants(shape: Shape, device: torch.device, compile_: bool) -> list[Variant]:
    return [lmforge_variant("lmforge eager", shape, device, False),
            hf_variant("transformers eager", shape, device, False),
            lmforge_variant("lmforge compiled", shape, device, compile_),
            hf_variant("transformers compiled", shape, device, compile_),
            lmforge_variant("lmforge eager unfused", shape, device, False, fused=False)]


def run_interleaved(variants: list[Variant], shape: Shape, device: torch.device, warmup: int, steps: int) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(warmup + steps):
        tokens = torch.randint(shape.vocab, (shape.batch, shape.context + 1), generator=gen, device=device)
        for v in variants:  # every variant sees this batch, in the same order every round
            timed_step(v, tokens, device, measured=i >= warmup)


def verdict(ok: bool, judged: bool) -> str:
    return ("PASS" if ok else "MISS") if judged else "not judged (smoke)"


def print_table(variants: list[Variant], tok_s: dict[str, float], gb: dict[str, float]) -> None:
    ours_e, hf_e, ours_c, hf_c, unfused = variants
    same_mode = {ours_e.name: hf_e.name, hf_e.name: hf_e.name, ours_c.name: hf_c.name, hf_c.name: hf_c.name,
                 unfused.name: hf_e.name}
    print(f"{'variant':<22} {'tokens/s':>10} {'ms/step':>8} {'peak GB':>8} {'x HF same mode':>15} {'mem x HF eager':>15}")
    for v in variants:
        print(f"{v.name:<22} {tok_s[v.name]:>10.0f} {1e3 * statistics.median(v.times):>8.1f} {gb[v.name]:>8.2f} "
              f"{tok_s[v.name] / tok_s[same_mode[v.name]]:>15.3f} {gb[v.name] / gb[hf_e.name]:>15.3f}")


def lmforge_mfu(variants: list[Variant], tok_s: dict[str, float], device: torch.device) -> tuple[float, str]:
    """MFU of lmforge's faster variant, and a line saying which and on what terms."""
    best = max(variants[0], variants[2], key=lambda v: tok_s[v.name])
    flops = CausalLM(Config()).flops_per_token(best.model)
    peak = peak_flops(device, torch.bfloat16)
    mfu = flops * tok_s[best.name] / peak if peak else float("nan")
    peak_text = f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown (not in GPU_PEAK_TFLOPS)"
    return mfu, f"{best.name}, {flops / 1e6:.1f} MFLOP/token, bf16 peak {peak_text}"


def report(variants: list[Variant], shape: Shape, device: torch.device, judged: bool) -> None:
    ours_e, hf_e, ours_c, hf_c, unfused = variants
    tok_s = {v.name: shape.batch * shape.context / statistics.median(v.times) for v in variants}
    gb = {v.name: peak_gb(v, device) for v in variants}
    print_table(variants, tok_s, gb)
    r_eager, r_comp = tok_s[ours_e.name] / tok_s[hf_e.name], tok_s[ours_c.name] / tok_s[hf_c.name]
    mem_ratio = gb[ours_e.name] / gb[hf_e.name]
    mfu, terms = lmforge_mfu(variants, tok_s, device)
    fused_time = statistics.median(ours_e.times) / statistics.median(unfused.times)
    fused_mem = gb[ours_e.name] / gb[unfused.name]
    print(f"goal lmforge eager >= 1.3x transformers eager tokens/s: {r_eager:.3f}  {verdict(r_eager >= 1.3, judged)}")
    print(f"goal lmforge compiled >= 1.1x transformers compiled:    {r_comp:.3f}  {verdict(r_comp >= 1.1, judged)}")
    print(f"goal lmforge eager memory <= 0.5x transformers eager:   {mem_ratio:.3f}  {verdict(mem_ratio <= 0.5, judged)}")
    print(f"goal MFU >= 0.45 ({terms}): {mfu:.3f}  {verdict(mfu >= 0.45, judged)}")
    print(f"goal fused loss step time <= 1.0x the unfused loss's:  {fused_time:.3f}  {verdict(fused_time <= 1.0, judged)}"
          f"  (memory {fused_mem:.3f}x)")
    print(f"RESULT tok_s_ratio_eager={r_eager:.3f} tok_s_ratio_compiled={r_comp:.3f} mem_ratio={mem_ratio:.3f} mfu={mfu:.3f} "
          f"fused_step_ratio={fused_time:.3f} fused_mem_ratio={fused_mem:.3f}")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        sys.exit(2)
    shape = SMOKE if args.smoke else FULL
    compile_ = args.compile_smoke if args.smoke else True
    import transformers

    mode = ("; SMOKE shape" + ("" if compile_ else ", the compiled variants run eager")) if args.smoke else ""
    print(f"device: {device_name(device)}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"batch {shape.batch} x {shape.context}, {args.warmup} warm-up + {args.steps} measured steps per variant{mode}")
    variants = build_variants(shape, device, compile_)
    n_ours, n_hf = (sum(p.numel() for p in v.model.parameters()) for v in variants[:2])
    print(f"parameters: lmforge {n_ours / 1e6:.2f}M, transformers {n_hf / 1e6:.2f}M")
    run_interleaved(variants, shape, device, args.warmup, args.steps)
    if device.type != "cuda":
        print("memory: nan on a CPU (torch keeps no allocator statistics there)")
    report(variants, shape, device, judged=not args.smoke)


if __name__ == "__main__":
    main()
