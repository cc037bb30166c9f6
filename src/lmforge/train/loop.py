"""The one training loop. Every task trains through `train()`."""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from lmforge.config import Config, save_config
from lmforge.hf.load import quantised_imports
from lmforge.errors import Diverged, UserError
from lmforge.io import fill_folder, sweep_temps, weights_metadata
from lmforge.model.build import parameter_summary
from lmforge.optim import build_optimizer, extend_schedule, lr_at, set_lr, start_schedule
from lmforge import quant
from lmforge.rundir import write_selection
from lmforge.runs import base_reference, stores_trained_only
from lmforge.tasks import make_task
from lmforge.train import distributed, trackers
from lmforge.train.adversarial import Adversary
from lmforge.train.checkpoint import CKPT_DIR, checkpoints
from lmforge.train.checkpointer import BestKeeper, Checkpointer, TrainState, refuse_busy_run_dir
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
    tracked: list[str] = field(default_factory=list)  # where each tracker of log.trackers holds the run


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
        return Trainer(cfg, resume, d, precision).train()
    finally:
        distributed.teardown(d)


def check_base_dtype(cfg: Config, d: distributed.Dist) -> None:
    """peft.base_dtype (a quantised frozen base for LoRA) where it can run: one process (DDP would broadcast
    and FSDP shard the torchao weights, which neither supports), torchao installed, an NF4 kernel on the
    device. One line, before anything is read or written."""
    base_dtype = cfg.peft.base_dtype
    if base_dtype == "none":
        return
    if d.active:
        raise UserError(f"config: peft.base_dtype = {base_dtype} trains in one process; under torchrun "
                        f"(train.parallel = {d.parallel}) DDP and FSDP cannot replicate or shard the quantised "
                        "weights: run without torchrun, or set peft.base_dtype = none")
    quant.check(base_dtype, d.device)


class Trainer:
    """One run: `__init__` sets it up (resumed where asked), `train` runs the loop. The loop's owners:
    TrainState (the counters), Checkpointer (when and how to save, and the resume), BestKeeper (the best
    weights and early stopping), Throughput (tokens/s and MFU) and EagerFallback (around the step)."""

    def __init__(self, cfg: Config, resume: tuple[Path, dict] | None, d: distributed.Dist, precision: Precision):
        tc = cfg.train  # a fine-tuning task's setup sets max_steps from its epochs, in place
        self.cfg, self.d, self.precision = cfg, d, precision
        set_tf32(d.device, tc.tf32)
        check_base_dtype(cfg, d)  # before the task reads anything
        with distributed.main_first(d):  # rank 0 alone tracks; its refusal stops every rank
            if d.main:  # a tracker's missing library or unreachable store: one line before anything is written
                trackers.check(cfg)
        self.run_dir = new_run_dir(cfg)
        if resume is None:
            refuse_busy_run_dir(self.run_dir)
        self.scaler = precision.grad_scaler()  # fp16 only
        random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self.task = make_task(cfg)
        self.task.shard = (d.rank, d.world)
        with distributed.main_first(d), quantised_imports(cfg.peft.base_dtype):  # rank 0 fills the token cache first
            # the task's one set-up; bad data stops the run here, before anything is written. A pretrained model
            # it imports from a Hugging Face folder streams into quantised layers where peft.base_dtype says so
            self.task.setup()
        if summary := self.task.summary():  # a pre-training run: its corpus, and the epochs its steps cover
            self.say(summary)
        # a PEFT run's checkpoints hold only what trains: it resumes on its base's weights too
        self._build(pretrained=resume is None or stores_trained_only(cfg))
        if d.main:  # what killed writes left is stale now: no process of this run is writing yet
            swept = sweep_temps(self.run_dir) + sweep_temps(self.run_dir / CKPT_DIR)
            if swept:
                self.say(f"lmforge: removed {len(swept)} temporary file(s) that killed writes left in {self.run_dir} "
                         f"({', '.join(p.name for p in swept[:3])})")
        self.keeper = BestKeeper(d, self.run_dir, self.task.selection(), cfg.eval.patience, self.base)
        self.state = TrainState(best=self.keeper.worst)
        self.checkpointer = Checkpointer(d, self.run_dir, tc, self.model, self.optimizer, self.batches, self.scaler,
                                         self.base)
        self.checkpointer.resume(resume, self.state)
        self._settle_schedule(resumed=resume is not None)
        if d.main:  # all of the run directory's first files or none: a full disk leaves no half-made run
            fill_folder(self.run_dir, self._write_start)
        self.meter = Throughput(self.task.flops_per_token(self.model), peak_flops(d.device, precision.dtype), d.world,
                                remeasure=functools.partial(peak_flops, d.device, precision.dtype, fresh=True))
        on = f"{d.world} x {d.device} ({d.parallel})" if d.active else str(d.device)
        self.say(f"lmforge: {cfg.task} model, {parameter_summary(self.model)}, on {on} in {precision.name}; "
                 f"run directory {self.run_dir}")
        if self.base is not None:
            self.say(f"lmforge: peft.method {cfg.peft.method}: checkpoints and the best weights keep only what trains; "
                     f"the frozen rest is read from {self.base['base_model']}")
        layers = quant.quantised_layers(self.model)
        if layers:
            held = sum(quant.storage_bytes(m.weight) for m in layers.values()) / 2**20
            fp32 = sum(m.weight.numel() for m in layers.values()) * 4 / 2**20
            self.say(f"lmforge: peft.base_dtype {cfg.peft.base_dtype}: {len(layers)} frozen Linear weights of the "
                     f"blocks held in {held:.1f} MiB ({fp32:.1f} MiB in fp32); LoRA, embeddings, norms and the head in fp32")
        self.take_step = EagerFallback(self.train_step, self.model, self.optimizer, tc)

    def _settle_schedule(self, resumed: bool) -> None:
        """Write the schedule this session follows into the config before config.yaml is written (a fine-tuning
        task's setup has set max_steps from its epochs by now): a fresh run records its horizon and clamps a
        warmup as long as the run; a resumed run that extends max_steps keeps its schedule or restarts it."""
        tc = self.cfg.train
        if not resumed:
            for note in start_schedule(tc):
                self.say(f"lmforge: note: {note}")
            return
        extension = extend_schedule(tc, self.state.step)
        if extension:
            self.say(f"lmforge: extending run {self.run_dir} {extension}")

    def _write_start(self, folder: Path) -> None:
        save_config(self.cfg, folder / "config.yaml")
        write_selection(folder, *self.task.selection(), self.task.final_report)
        self.task.save_artifacts(folder)

    def _build(self, pretrained: bool) -> None:
        """The model (wrapped for DDP or FSDP), its optimizer, the train batches and any adversary."""
        cfg, tc, d = self.cfg, self.cfg.train, self.d
        # the same initial weights on every rank (FSDP shards them as they are)
        model = self.task.build_model(pretrained=pretrained)
        # peft.base_dtype: a base the import did not quantise as it streamed (one from a run directory) is
        # quantised here, layer by layer; layers quantised already are left as they are
        quant.quantise_model(model, cfg.peft.base_dtype)
        # what a PEFT run's weights and checkpoints reference instead of copying (fingerprinted before any step)
        self.base = base_reference(cfg, model) if stores_trained_only(cfg) else None
        self.model = quant.to(model, d.device)
        self.runner = distributed.wrap(d, self.model, tc, self.precision.dtype)  # runner(fn, *args) = fn(model, *args)
        if d.active:
            torch.manual_seed(tc.seed + d.rank)  # but different dropout
        self.optimizer = build_optimizer(self.model, tc)
        self.batches = self.task.train_batches(tc.seed)
        self.adversary = None
        if cfg.robust.adversarial != "none":
            if d.active:
                raise UserError("config: robust.adversarial runs in a single process (its extra forward passes do not "
                                "fit DDP's and FSDP's gradient synchronisation yet)")
            self.adversary = Adversary(self.model, cfg.robust)

    def say(self, text: str) -> None:
        if self.d.main:
            print(text)

    def train(self) -> RunResult:
        """Step and log; then, paused for throughput: evaluate, stop early or out of time, checkpoint."""
        cfg, tc, d, state = self.cfg, self.cfg.train, self.d, self.state
        tracker = Tracker(self.run_dir, cfg, tc.max_steps, state.step) if d.main else NullTracker()
        self.runner.train()
        self.meter.start()
        close = lambda: tracker.close(schedule=[lr_at(s, tc) for s in range(tc.max_steps)],  # noqa: E731
                                      metric=self.keeper.metric)
        try:
            last_val, stop_reason = self._steps(tracker)
        except BaseException:  # a diverged run keeps its logged rows and curves too; the error is the news
            with contextlib.suppress(Exception):  # a full disk, say, cannot take the plot either
                close()
            self._end_failed(tracker)
            raise
        plot = close()
        train_seconds = self.meter.train_seconds()
        self.say(f"lmforge: stopped at step {state.step} ({stop_reason}); best val {self.keeper.metric} {state.best:.4f}")
        try:
            text = self.finish()  # the task's final report is among the files the trackers upload
        except BaseException:
            self._end_failed(tracker)
            raise
        return RunResult(self.run_dir, state.step, state.best, self.keeper.metric, last_val, train_seconds, plot,
                         text, d.main, tracker.end())

    @staticmethod
    def _end_failed(tracker) -> None:
        """The trackers get what there is, their runs marked failed; the error that stopped the run is the news."""
        with contextlib.suppress(Exception):
            tracker.end(ok=False)

    def _steps(self, tracker) -> tuple[dict, str]:
        """The loop itself, until max_steps, early stopping or the time budget; (last val metrics, why it stopped)."""
        cfg, tc, d, state = self.cfg, self.cfg.train, self.d, self.state
        last_val, stop_reason = {}, "max_steps"
        while state.step < tc.max_steps:
            micro_batches = [next(self.batches) for _ in range(tc.grad_accum)]
            lr = lr_at(state.step, tc)
            loss, grad_norm, applied = self.take_step(micro_batches)
            state.step += 1
            n_tokens = sum(b["input"].numel() for b in micro_batches) * d.world
            state.tokens += n_tokens
            self.meter.count(n_tokens)
            tracker.advance()
            if not applied:
                tracker.log(state.step, "skipped", {"loss": loss, "grad_norm": grad_norm, "lr": lr})
                self.nonfinite_step(loss, grad_norm)  # stops the run unless train.skip_nonfinite allows one more
            elif state.step % cfg.log.every == 0 or state.step == tc.max_steps:
                tracker.log(state.step, "train", {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                                  **self.meter.window(state.tokens)})
            with self.meter.paused():  # evaluation and checkpoints are not counted in throughput
                out_of_time = tc.max_time and distributed.any_rank(d, self.meter.elapsed() >= tc.max_time)
                final = state.step == tc.max_steps or out_of_time
                evaluating = (cfg.eval.every and state.step % cfg.eval.every == 0) or final
                if evaluating or self.checkpointer.due(state.step, final):
                    self.check_weights_finite()  # no NaN is ever kept as the best weights or checkpointed
                if evaluating:
                    last_val = self.evaluate()
                    self.keeper.observe(state, last_val, self.model)
                    tracker.log(state.step, "val", last_val)
                    if self.keeper.out_of_patience(state):
                        final, stop_reason = True, f"early stop: no val improvement in {state.bad_evals} evaluations"
                if out_of_time:
                    stop_reason = f"time budget of {tc.max_time:.0f}s reached"
                if self.checkpointer.due(state.step, final):
                    self.checkpointer.save(state)
            if final:
                break
        return last_val, stop_reason

    def nonfinite_step(self, loss: float, grad_norm: float) -> None:
        """A step that was not applied because its loss or gradient norm was NaN or infinite: skipped with a
        warning while train.skip_nonfinite allows, otherwise the run stops with one line (exit 3)."""
        tc, state = self.cfg.train, self.state
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if state.skipped < tc.skip_nonfinite:
            state.skipped += 1
            self.say(f"lmforge: warning: step {state.step}: {what}; the step was skipped, not applied "
                     f"({state.skipped} of train.skip_nonfinite = {tc.skip_nonfinite})")
            return
        allowed = f"all {tc.skip_nonfinite} skips that train.skip_nonfinite allows are used" if tc.skip_nonfinite \
            else "or allow skipping such steps with train.skip_nonfinite N"
        self.diverged(f"step {state.step}: {what}; the step was not applied", allowed)

    def check_weights_finite(self) -> None:
        """Weights that a finite step still drove to NaN or infinity (an enormous learning rate) stop the run
        before they are evaluated, kept as the best or checkpointed."""
        if not distributed.trained_weights_finite(self.d, self.model):
            self.diverged(f"step {self.state.step}: the weights are no longer finite after this step", "")

    def diverged(self, what: str, more: str) -> None:
        """Stop a run that diverged, naming what it keeps and what to change."""
        tc = self.cfg.train
        saved = checkpoints(self.run_dir / CKPT_DIR)
        kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved"
        best = self.keeper.path
        kept += f", the best weights {best} (step {weights_metadata(best).get('step', '?')})" if best.is_file() else \
            ", and no best weights"
        clip = f"clip harder with train.grad_clip (now {tc.grad_clip:g})" if tc.grad_clip else "set train.grad_clip (now off)"
        raise Diverged(f"train: training diverged at {what}; {kept}. Lower train.lr (now {tc.lr:g}), {clip}"
                       f"{', ' + more if more else ''}")

    def train_step(self, micro_batches: list[dict]) -> tuple[float, float, bool]:
        """One optimizer step over the micro-batches; (mean loss per target, gradient norm before clipping,
        whether it was applied: not when the loss or gradient norm is NaN or infinite)."""
        # Normalise by the real target tokens of all micro-batches of all ranks together, so k accumulated
        # micro-batches on n ranks give exactly the gradient of one batch k x n times larger (not a mean
        # of means). DDP and FSDP average gradients over ranks: dividing by count / world makes that a sum.
        d = self.d
        local = sum(self.task.count(b) for b in micro_batches)
        n_targets = max(1, distributed.sum_over_ranks(d, local)[0])  # an all-ignored step adds no gradient
        total = 0.0
        for i, b in enumerate(micro_batches):
            with distributed.no_sync(self.runner, skip=i < len(micro_batches) - 1):  # sync once, on the last
                total += self._forward_backward(self._to_device(b), n_targets / d.world)
        loss = distributed.sum_over_ranks(d, total)[0] / n_targets
        grad_norm = distributed.grad_norm_value(self._unscale_and_clip())
        # every rank sees the same summed loss and the same global norm, so they all agree to skip.
        # fp16: an overflowing gradient is the loss scaler's business (it skips the step and lowers the scale)
        applied = math.isfinite(loss) and (math.isfinite(grad_norm) or self.scaler is not None)
        self._apply_step() if applied else self._drop_step()
        return loss, grad_norm, applied

    def _forward_backward(self, batch: dict, divisor: float) -> float:
        """Backward of the batch's summed loss / divisor (plus any adversarial loss); returns the sum."""
        def scaled_loss() -> torch.Tensor:
            with self.precision.autocast():
                return self.runner(self.task.loss, batch) / divisor

        loss = scaled_loss()
        self._for_backward(loss).backward()
        if self.adversary is not None:  # adds the gradient at the perturbed embeddings
            self.adversary.attack(lambda: self._for_backward(scaled_loss()))
        return loss.item() * divisor

    def _for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """fp16: the loss times the loss scale, so small gradients survive."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _optimizer_parts(self) -> tuple:
        return getattr(self.optimizer, "optimizers", (self.optimizer,))  # Muon + AdamW are stepped as one

    def _unscale_and_clip(self) -> torch.Tensor:
        """Clip the gradients (unscaled first under fp16); returns their norm before clipping."""
        if self.scaler is not None:
            for part in self._optimizer_parts():
                self.scaler.unscale_(part)  # clip the true gradients
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"))

    def _apply_step(self) -> None:
        """Set this step's learning rate and step."""
        scaler, optimizer = self.scaler, self.optimizer
        set_lr(optimizer, self.state.step, self.cfg.train)
        if scaler is not None:
            for part in self._optimizer_parts():
                scaler.step(part)  # skipped when a gradient overflowed; then the scale halves
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _drop_step(self) -> None:
        """Forget a step's gradients without applying them (fp16: the scale still halves, as for an overflow)."""
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.d.device, non_blocking=True) for k, v in batch.items()}

    def evaluate(self) -> dict:
        # Every rank evaluates the whole val set (FSDP needs them all in each forward); rank 0's result counts.
        self.runner.eval()
        with torch.no_grad(), self.precision.autocast():
            metrics = distributed.from_main(self.d, self.runner(self.task.evaluate, self._to_device))
        self.runner.train()
        return metrics

    def finish(self) -> str:
        """The task's end-of-run text and files, made on the best weights where the task reports on them
        (on every rank: they all take part in the forward passes)."""
        if self.adversary is not None:
            self.adversary.remove()
        if self.task.final_report:  # the report is on the best weights
            self.keeper.load_best(self.model)
        self.runner.eval()
        with torch.no_grad():
            return self.runner(self.task.finish, self.run_dir)


class EagerFallback:
    """The train step, with the model's blocks compiled when train.compile asks. torch.compile compiles
    lazily and on some platforms fails only at the first call: then warn, go back to eager mode and
    take that step again."""

    def __init__(self, step, model: torch.nn.Module, optimizer, tc):
        self.step, self.model, self.optimizer = step, model, optimizer
        self.checkpointed = tc.activation_checkpointing
        self.compiled = set_compiled(model, tc.compile, self.checkpointed)

    def __call__(self, micro_batches: list[dict]) -> tuple[float, float, bool]:
        try:
            return self.step(micro_batches)
        except Exception as e:
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "continuing in eager mode", stacklevel=1)
            self.compiled = set_compiled(self.model, False, self.checkpointed)
            self.optimizer.zero_grad(set_to_none=True)  # what the failed attempt accumulated
            return self.step(micro_batches)


class Throughput:
    """Tokens per second and model FLOPs utilisation over each log window, and the seconds spent
    training; time paused for evaluation and checkpoints counts in neither."""

    def __init__(self, flops_per_token: float, peak: float | None, world: int, remeasure=None):
        self.flops_per_token, self.peak, self.world = flops_per_token, peak, world
        self.remeasure = remeasure  # () -> the peak measured again, called at most once (see _mfu)

    def start(self) -> None:
        self.started = self.window_start = time.perf_counter()
        self.window_tokens, self.paused_seconds = 0, 0.0

    def count(self, n_tokens: int) -> None:
        self.window_tokens += n_tokens

    def window(self, tokens: int) -> dict[str, float]:
        """A train row's figures since the last call: tok_s, the run's `tokens` (passed through, so the row
        keeps its order), and mfu where the device's peak is known; then a new window starts."""
        tok_s = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        figures = {"tok_s": tok_s, "tokens": tokens}
        if self.peak:
            figures["mfu"] = self._mfu(tok_s)
        self.window_start, self.window_tokens = time.perf_counter(), 0
        return figures

    def _mfu(self, tok_s: float) -> float:
        """The window's model FLOPs utilisation, never above 1. A device cannot beat its peak, so a rate above
        it means the peak is wrong: a CPU's measured while the machine was busy, or a GPU matched to the wrong
        data-sheet row. The peak is measured once more (outside the counted time), and where the rate still
        beats it the peak is taken to be at least that rate."""
        achieved = self.flops_per_token * tok_s / self.world  # per device: tok_s counts every rank's tokens
        if achieved > self.peak and self.remeasure is not None:
            with self.paused():
                self.peak = max(self.peak, self.remeasure())
            self.remeasure = None
        self.peak = max(self.peak, achieved)
        return achieved / self.peak

    @contextlib.contextmanager
    def paused(self):
        pause = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            self.window_start, self.paused_seconds = self.window_start + now - pause, self.paused_seconds + now - pause

    def elapsed(self) -> float:
        """Wall-clock seconds since the start, pauses included (what train.max_time limits)."""
        return time.perf_counter() - self.started

    def train_seconds(self) -> float:
        return self.elapsed() - self.paused_seconds
