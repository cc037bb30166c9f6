"""What a run keeps on disk while it trains, and who decides when.

`TrainState` holds the loop's counters. `Checkpointer` saves them with the model, optimizer, data
sampler, RNG states and loss scale every `train.checkpoint_every` steps and at the last, and resumes all
of it. `BestKeeper` writes model.safetensors whenever the selection metric improves, counts the
evaluations without improvement for early stopping, and loads the best weights back at the end.
The formats (one file or DCP shards, atomic writes, pruning) are train/checkpoint.py's.

Given a base reference (runs.base_reference: a PEFT run), both keep only the parameters that train and
record the reference with them; the frozen rest is the base's, which the model already holds when it
resumes or loads the best weights back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.train import distributed
from lmforge.io import load_weights, read_weights, save_weights
from lmforge.peft import trained_names
from lmforge.runs import BASE_FINGERPRINT, BASE_MODEL, WEIGHTS
from lmforge.train.checkpoint import (CKPT_DIR, checkpoints, load_model_state, load_training_state, rng_state,
                                      save_checkpoint, save_sharded_checkpoint, set_rng_state)


@dataclass
class TrainState:
    """The loop's counters, saved in every checkpoint and restored on resume."""

    step: int = 0
    best: float = math.inf  # the best value of the selection metric so far (its direction: BestKeeper.worst)
    bad_evals: int = 0  # evaluations since it last improved
    tokens: int = 0  # input tokens trained on, all ranks together
    skipped: int = 0  # steps not applied because their loss or gradient norm was not finite

    def state_dict(self) -> dict:
        return {"step": self.step, "best": self.best, "bad_evals": self.bad_evals, "tokens": self.tokens,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best, self.bad_evals, self.tokens = state["step"], state["best"], state["bad_evals"], state["tokens"]
        self.skipped = state.get("skipped", 0)  # absent from checkpoints written before the guard


def refuse_busy_run_dir(run_dir: Path) -> None:
    """A fresh run in a directory that holds another run's checkpoints would mix the two: refused, before the
    data is read. Temp files of a killed first checkpoint are no run."""
    if checkpoints(run_dir / CKPT_DIR):
        raise UserError(f"log.run_dir: {run_dir} already holds a run; use --resume auto or another directory")


class Checkpointer:
    """When a run saves (every `train.checkpoint_every` steps and at its last step), how (one file from
    one process, DCP shards from several), how many it keeps, and how it resumes exactly."""

    def __init__(self, d: distributed.Dist, run_dir: Path, tc, model, optimizer, batches, scaler, base: dict | None):
        self.d, self.run_dir = d, run_dir
        self.every, self.keep = tc.checkpoint_every, tc.keep_checkpoints
        self.model, self.optimizer, self.batches, self.scaler = model, optimizer, batches, scaler
        self.base = base  # a PEFT run's base reference: checkpoints then hold only what trains

    def resume(self, resume: tuple[Path, dict] | None, train_state: TrainState) -> None:
        """Continue from `resume` (a checkpoint and its loaded state, as the CLI found them); None: a fresh run
        (refuse_busy_run_dir has checked that it mixes with no other run's checkpoints)."""
        if resume is None:
            return
        path, state = resume
        saved_base = state.get("base")  # absent from a checkpoint of the whole model
        if saved_base and saved_base[BASE_FINGERPRINT] != self.base[BASE_FINGERPRINT]:
            raise UserError(f"checkpoint: {path}: holds only the trained weights of a PEFT run, and its base "
                            f"{self.base[BASE_MODEL]} (finetune.init_from) has changed since the run began; "
                            "expected the model it started from")
        load_training_state(self.d, path, state, self.model, self.optimizer, trained_only=bool(saved_base))
        self._load_extras(state, train_state)
        if self.d.main:
            print(f"lmforge: resuming {self.run_dir} from {path.name} (step {train_state.step})")

    def due(self, step: int, final: bool) -> bool:
        return bool(self.every and step % self.every == 0) or final

    def save(self, train_state: TrainState) -> None:
        """Every rank calls it: the sharded format has each rank write its own shards."""
        extras, step = self._extras(train_state), train_state.step
        if self.d.active:
            save_sharded_checkpoint(self.d, self.run_dir, step, self.model, self.optimizer, extras, self.keep,
                                    trained_only=self.base is not None)
        else:
            model_state = self.model.state_dict()
            if self.base is not None:
                trained = trained_names(self.model)
                model_state = {k: v for k, v in model_state.items() if k in trained}
            state = {"model": model_state, "optimizer": self.optimizer.state_dict(), **extras}
            save_checkpoint(self.run_dir, step, state, self.keep)

    # Everything but the model and optimizer is written and read back by these two alone. The keys are
    # those of every earlier lmforge checkpoint ("data", "rng", "scaler" and TrainState's), so old runs resume.

    def _extras(self, train_state: TrainState) -> dict:
        extras = {"data": self.batches.state_dict(), "rng": rng_state(), **train_state.state_dict()}
        if self.base is not None:
            extras["base"] = self.base
        if self.d.active:  # each rank draws its own dropout masks
            extras["rng"] = distributed.gather_objects(self.d, extras["rng"])
        if self.scaler is not None:
            extras["scaler"] = self.scaler.state_dict()
        return extras

    def _load_extras(self, state: dict, train_state: TrainState) -> None:
        if self.scaler is not None and "scaler" in state:  # a run that was bf16 or fp32 before starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])  # the global position: the same at any world size
        rng = state["rng"]  # a list (one per rank) from a distributed run
        set_rng_state(rng[min(self.d.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
        train_state.load_state_dict(state)


class BestKeeper:
    """The weights that score best on the task's selection metric (model.safetensors, rewritten at each
    improvement), and early stopping after `eval.patience` evaluations without one."""

    def __init__(self, d: distributed.Dist, run_dir: Path, selection: tuple[str, bool], patience: int,
                 base: dict | None):
        self.d, self.path, self.patience = d, run_dir / WEIGHTS, patience
        self.metric, self.higher_better = selection
        self.base = base  # a PEFT run's base reference: the file then holds only what trains

    @property
    def worst(self) -> float:
        """The starting best, which any first score beats."""
        return -math.inf if self.higher_better else math.inf

    def observe(self, train_state: TrainState, metrics: dict, model) -> None:
        """Count an evaluation's `metrics` (rank 0's, on every rank) and keep the weights when they are
        the best so far. Every rank calls it: FSDP gathers the shards, rank 0 writes."""
        score = metrics[self.metric]
        better = score > train_state.best if self.higher_better else score < train_state.best
        if not (math.isfinite(score) and better):  # a NaN or infinite score is never the best
            train_state.bad_evals += 1
            return
        train_state.best, train_state.bad_evals = score, 0
        weights = distributed.full_weights(self.d, model)
        if self.d.main:
            metadata = {"step": str(train_state.step), f"val_{self.metric}": f"{score:.6f}"}
            if self.base is not None:
                trained = trained_names(model)
                weights, metadata = {k: v for k, v in weights.items() if k in trained}, {**metadata, **self.base}
            save_weights(weights, self.path, metadata)

    def out_of_patience(self, train_state: TrainState) -> bool:
        return bool(self.patience) and train_state.bad_evals >= self.patience

    def load_best(self, model) -> None:
        """The best weights into every rank's model: whole (one process, DDP), or each rank's shards of
        them (FSDP). Every rank calls it."""
        if not distributed.from_main(self.d, self.path.is_file()):  # rank 0 has written its last by now
            return
        trained_only = self.base is not None
        if self.d.parallel != "fsdp":
            if trained_only:
                load_model_state(model, read_weights(self.path)[0], self.path, trained_only)
            else:
                load_weights(model, self.path)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # every rank reads the whole file and keeps its shards; a tied weight, stored once, loads through its twin
        set_model_state_dict(model, read_weights(self.path)[0],
                             options=StateDictOptions(full_state_dict=True, ignore_frozen_params=trained_only,
                                                      strict=not trained_only))
