"""The one training loop. Every task trains through `train()`."""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from lmforge.config import Config, save_config
from lmforge.errors import UserError
from lmforge.optim import build_optimizer, lr_at, set_lr
from lmforge.peft import parameter_summary
from lmforge.tasks import make_task
from lmforge.train import distributed
from lmforge.train.adversarial import Adversary
from lmforge.train.checkpoint import (WEIGHTS, load_training_state, load_weights, rng_state, save_checkpoint,
                                      save_sharded_checkpoint, save_weights, set_rng_state)
from lmforge.train.device import pick_device, set_compiled
from lmforge.train.perf import peak_flops
from lmforge.train.precision import Precision, resolve_precision, set_tf32
from lmforge.train.tracking import NullTracker, Tracker


@dataclass
class RunResult:
    run_dir: Path
    step: int
    best: float  # the best value of the selection metric (val loss unless the task picks another)
    metric: str  # that metric's name
    last_val: dict
    train_seconds: float  # time in training steps this session, without evaluation and checkpoints
    plot: Path | None
    text: str  # what the task printed at the end (samples)
    is_main: bool = True  # rank 0, or the only process: the one that reports


def new_run_dir(cfg: Config) -> Path:
    if cfg.log.run_dir:
        return Path(cfg.log.run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.log.out_dir) / f"{stamp}-{cfg.task}"


def train(cfg: Config, resume: tuple[Path, dict] | None = None) -> RunResult:
    """Train `cfg.task`; `resume` is (checkpoint path, its loaded state) to continue a run exactly.
    Under torchrun every process calls this; they train one model together (train/distributed.py)."""
    device = pick_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device, cfg.train.parallel)  # refused before any set-up
    d = distributed.setup(cfg.train, device)
    try:
        # every rank computes in rank 0's choice: `auto` on a CPU rests on a timing that could differ by rank
        precision = Precision(distributed.from_main(d, precision.name), d.device)
        return _train(cfg, resume, d, precision)
    finally:
        distributed.teardown(d)


def _train(cfg: Config, resume: tuple[Path, dict] | None, d: distributed.Dist, precision: Precision) -> RunResult:
    tc = cfg.train  # a fine-tuning task's setup sets max_steps from its epochs, in place
    device = d.device
    say = print if d.main else lambda *args, **kwargs: None
    set_tf32(device, tc.tf32)
    scaler = precision.grad_scaler()  # fp16 only
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    task = make_task(cfg)
    task.shard = (d.rank, d.world)
    with distributed.main_first(d):  # rank 0 fills the token cache, the others then read it
        task.setup()  # bad data stops the run here, before anything is written
    # the same initial weights on every rank (FSDP shards them as they are)
    model = task.build_model(pretrained=resume is None).to(device)
    runner = distributed.wrap(d, model, tc, precision.dtype)  # runner(fn, *args) = fn(model, *args)
    if d.active:
        torch.manual_seed(tc.seed + d.rank)  # but different dropout
    optimizer = build_optimizer(model, tc)
    batches = task.train_batches(tc.seed)
    adversary = None
    if cfg.robust.adversarial != "none":
        if d.active:
            raise UserError("config: robust.adversarial runs in a single process (its extra forward passes do not "
                            "fit DDP's and FSDP's gradient synchronisation yet)")
        adversary = Adversary(model, cfg.robust)

    metric, higher_better = task.selection()
    step, best, bad_evals, tokens_seen = 0, -math.inf if higher_better else math.inf, 0, 0
    run_dir = new_run_dir(cfg)
    if resume is not None:
        ckpt_path, state = resume
        load_training_state(d, ckpt_path, state, model, optimizer)
        if scaler is not None and "scaler" in state:  # a run that was bf16 or fp32 before starts a fresh scale
            scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data"])  # the global position: the same at any world size
        rng = state["rng"]  # a list (one per rank) from a distributed run
        set_rng_state(rng[min(d.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
        step, best, bad_evals, tokens_seen = state["step"], state["best"], state["bad_evals"], state["tokens"]
        say(f"lmforge: resuming {run_dir} from {ckpt_path.name} (step {step})")
    elif (run_dir / "checkpoints").is_dir():
        raise UserError(f"log.run_dir: {run_dir} already holds a run; use --resume auto or another directory")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        task.save_artifacts(run_dir)

    flops_per_token = task.flops_per_token(model)
    peak = peak_flops(device, precision.dtype)
    on = f"{d.world} x {device} ({d.parallel})" if d.active else str(device)
    say(f"lmforge: {cfg.task} model, {parameter_summary(model)}, on {on} in {precision.name}; run directory {run_dir}")

    compiled = set_compiled(model, tc.compile, tc.activation_checkpointing)
    to_device = lambda b: {k: v.to(device, non_blocking=True) for k, v in b.items()}  # noqa: E731

    def for_backward(loss: torch.Tensor) -> torch.Tensor:  # fp16: times the loss scale, so small gradients survive
        return scaler.scale(loss) if scaler is not None else loss

    def train_step(micro_batches) -> tuple[float, float]:
        # Normalise by the real target tokens of all micro-batches of all ranks together, so k accumulated
        # micro-batches on n ranks give exactly the gradient of one batch k x n times larger (not a mean
        # of means). DDP and FSDP average gradients over ranks: dividing by count / world makes that a sum.
        local = sum(task.count(b) for b in micro_batches)
        n_targets = max(1, distributed.sum_over_ranks(d, local)[0])  # an all-ignored step adds no gradient
        total = 0.0
        for i, b in enumerate(micro_batches):
            with distributed.no_sync(runner, skip=i < len(micro_batches) - 1):  # sync once, on the last
                b = to_device(b)

                def scaled_loss(b=b) -> torch.Tensor:
                    with precision.autocast():
                        return runner(task.loss, b) / (n_targets / d.world)

                loss = scaled_loss()
                for_backward(loss).backward()
                if adversary is not None:  # adds the gradient at the perturbed embeddings
                    adversary.attack(lambda: for_backward(scaled_loss()))
            total += loss.item() * (n_targets / d.world)
        parts = getattr(optimizer, "optimizers", (optimizer,))  # Muon + AdamW are stepped as one
        if scaler is not None:
            for part in parts:
                scaler.unscale_(part)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        set_lr(optimizer, step, tc)
        if scaler is not None:
            for part in parts:
                scaler.step(part)  # skipped when a gradient overflowed; then the scale halves
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return distributed.sum_over_ranks(d, total)[0] / n_targets, distributed.grad_norm_value(grad_norm)

    def checkpoint() -> None:
        extras = {"data": batches.state_dict(), "rng": rng_state(), "step": step, "best": best,
                  "bad_evals": bad_evals, "tokens": tokens_seen}
        if scaler is not None:
            extras["scaler"] = scaler.state_dict()
        if d.active:
            extras["rng"] = distributed.gather_objects(d, extras["rng"])
            save_sharded_checkpoint(d, run_dir, step, model, optimizer, extras, tc.keep_checkpoints)
        else:
            save_checkpoint(run_dir, step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extras},
                            tc.keep_checkpoints)

    def evaluate() -> dict:
        # Every rank evaluates the whole val set (FSDP needs them all in each forward); rank 0's result counts.
        nonlocal best, bad_evals
        runner.eval()
        with torch.no_grad(), precision.autocast():
            metrics = distributed.from_main(d, runner(task.evaluate, to_device))
        runner.train()
        score = metrics[metric]
        if score > best if higher_better else score < best:
            best, bad_evals = score, 0
            weights = distributed.full_weights(d, model)
            if d.main:
                save_weights(weights, run_dir / WEIGHTS, {"step": str(step), f"val_{metric}": f"{score:.6f}"})
        else:
            bad_evals += 1
        return metrics

    tracker = Tracker(run_dir, cfg.log, tc.max_steps, step) if d.main else NullTracker()
    runner.train()
    last_val: dict = {}
    started = window_start = time.perf_counter()
    window_tokens, stop_reason, paused = 0, "max_steps", 0.0
    while step < tc.max_steps:
        micro_batches = [next(batches) for _ in range(tc.grad_accum)]
        lr = lr_at(step, tc)
        try:
            loss, grad_norm = train_step(micro_batches)
        except Exception as e:  # torch.compile fails lazily, at the first call, on some platforms
            if not compiled:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "continuing in eager mode", stacklevel=1)
            compiled = set_compiled(model, False, tc.activation_checkpointing)
            optimizer.zero_grad(set_to_none=True)
            loss, grad_norm = train_step(micro_batches)
        step += 1
        n_tokens = sum(b["input"].numel() for b in micro_batches) * d.world
        tokens_seen += n_tokens
        window_tokens += n_tokens
        tracker.advance()
        if step % cfg.log.every == 0 or step == tc.max_steps:
            elapsed = time.perf_counter() - window_start
            tok_s = window_tokens / max(elapsed, 1e-9)
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tok_s": tok_s, "tokens": tokens_seen}
            if peak:
                metrics["mfu"] = flops_per_token * tok_s / (peak * d.world)  # tok_s counts every rank's tokens
            tracker.log(step, "train", metrics)
            window_start, window_tokens = time.perf_counter(), 0
        pause = time.perf_counter()  # evaluation and checkpoints are not counted in throughput
        out_of_time = tc.max_time and distributed.any_rank(d, time.perf_counter() - started >= tc.max_time)
        final = step == tc.max_steps or out_of_time
        if (cfg.eval.every and step % cfg.eval.every == 0) or final:
            last_val = evaluate()
            tracker.log(step, "val", last_val)
            if cfg.eval.patience and bad_evals >= cfg.eval.patience:
                final, stop_reason = True, f"early stop: no val improvement in {bad_evals} evaluations"
        if out_of_time:
            stop_reason = f"time budget of {tc.max_time:.0f}s reached"
        if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or final:
            checkpoint()
        now = time.perf_counter()
        window_start, paused = window_start + now - pause, paused + now - pause
        if final:
            break
    train_seconds = time.perf_counter() - started - paused
    plot = tracker.close(schedule=[lr_at(s, tc) for s in range(tc.max_steps)], metric=metric)
    say(f"lmforge: stopped at step {step} ({stop_reason}); best val {metric} {best:.4f}")
    if adversary is not None:
        adversary.remove()
    if task.report_best and not d.active and (run_dir / WEIGHTS).is_file():
        load_weights(model, run_dir / WEIGHTS)
    runner.eval()
    with torch.no_grad():
        text = runner(task.finish, run_dir)
    return RunResult(run_dir, step, best, metric, last_val, train_seconds, plot, text, d.main)
