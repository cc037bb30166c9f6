"""Pre-training throughput and memory: lmforge's GPT against transformers' GPT2LMHeadModel (SDPA).

Both models have the same shape (6 layers, width 384, 6 heads, context 256, vocabulary 8192, GPT-2's
tanh GELU, biases, tied embeddings, dropout 0), see the same random batches (8 x 256, fp32) and take
AdamW steps: lmforge through its causal-LM loss (chunked output projection + cross-entropy) and
optimizer factory, transformers with `labels=` and
torch.optim.AdamW, as its Trainer does. Steps are interleaved in one process (A B A B ...) and the
medians of the steady steps are compared.

Memory: the peak resident memory during one training step of each model (activations, gradients,
temporaries; see `memory.py`) on top of the bytes of its weights and optimizer state, counted exactly. MFU: lmforge's training FLOPs per token
(6 per matmul weight plus attention, PaLM appendix B) times tokens/s over the fp32 matmul peak
measured here (best of several 1024^3 and 2048^3 matmuls, before and after the steps).

Goals (issue 2): tok/s ratio >= 1.05, memory ratio <= 0.7, MFU >= 0.60.
Last line: RESULT tok_s_ratio=... mem_ratio=... mfu=...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmforge.config import TrainConfig  # noqa: E402
from lmforge.losses import linear_cross_entropy  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import GPT  # noqa: E402
from lmforge.optim import build_optimizer  # noqa: E402
from lmforge.train.perf import measure_matmul_flops  # noqa: E402
from memory import peak_bytes  # noqa: E402

VOCAB, LAYERS, WIDTH, HEADS, CONTEXT, BATCH = 8192, 6, 384, 6, 256, 8


def build_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, d_model=WIDTH, max_seq_len=CONTEXT,
                           pos="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True, dropout=0.0))
    hf_cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
    tc = TrainConfig(lr=3e-4, weight_decay=0.1)
    return (ours.train(), build_optimizer(ours, tc)), (hf.train(), torch.optim.AdamW(hf.parameters(), lr=3e-4, weight_decay=0.1))


def step_ours(model, opt, tokens):
    x, y = tokens[:, :-1], tokens[:, 1:]  # the causal-LM task's loss: chunked output projection + CE
    loss = linear_cross_entropy(model.features(x), model.head.weight, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_hf(model, opt, tokens):
    x = tokens[:, :-1]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def resident_bytes(model, opt) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="measured steps per model (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    (ours, opt_ours), (hf, opt_hf) = build_models()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    print(f"parameters: lmforge {n_ours / 1e6:.2f}M, transformers {n_hf / 1e6:.2f}M; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(VOCAB, (BATCH, CONTEXT + 1), generator=gen) for _ in range(args.warmup + args.steps)]

    peak = measure_matmul_flops(torch.float32)  # measured before and after the steps; the higher counts
    times = {"lmforge": [], "hf": []}
    for i, tokens in enumerate(batches):
        for name, step, model, opt in (("lmforge", step_ours, ours, opt_ours), ("hf", step_hf, hf, opt_hf)):
            t = time.perf_counter()
            step(model, opt, tokens)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    tokens_per_step = BATCH * CONTEXT
    tok_s = {k: tokens_per_step / statistics.median(v) for k, v in times.items()}

    mem = {}
    for name, step, model, opt in (("lmforge", step_ours, ours, opt_ours), ("hf", step_hf, hf, opt_hf)):
        mem[name] = resident_bytes(model, opt) + peak_bytes(lambda: step(model, opt, batches[0]))[0]

    peak = max(peak, measure_matmul_flops(torch.float32))
    mfu = ours.flops_per_token() * tok_s["lmforge"] / peak
    ratio, mem_ratio = tok_s["lmforge"] / tok_s["hf"], mem["lmforge"] / mem["hf"]
    print(f"tokens/s   lmforge {tok_s['lmforge']:9.0f}   transformers {tok_s['hf']:9.0f}   ratio {ratio:.3f} (goal >= 1.05)")
    print(f"peak MiB   lmforge {mem['lmforge'] / 2**20:9.1f}   transformers {mem['hf'] / 2**20:9.1f}   ratio {mem_ratio:.3f} (goal <= 0.70)")
    print(f"MFU        lmforge {mfu:.3f} of a measured fp32 matmul peak of {peak / 1e9:.1f} GFLOP/s (goal >= 0.60); "
          f"{ours.flops_per_token() / 1e6:.1f} MFLOP/token")
    print(f"RESULT tok_s_ratio={ratio:.3f} mem_ratio={mem_ratio:.3f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
