"""The loop's finiteness guard: a NaN or infinite loss or gradient norm stops the run with one line and
exit 3 (or is skipped, not applied, while train.skip_nonfinite allows), and no non-finite weights are
ever kept as the best, checkpointed or loaded for inference."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import read_metrics, tiny_overrides
from lmforge.cli import main
from lmforge.io import read_weights, save_weights
from lmforge.tasks.clm import CausalLM
from lmforge.train import loop
from lmforge.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # short training runs

STEP_CKPT = "step_{:08d}.pt"


def argv(tmp_path, corpus, **extra) -> list[str]:
    """`lmforge pretrain` of a tiny char-level run under tmp_path; keys are dotted with `__`."""
    over = tiny_overrides(tmp_path, corpus, **{k.replace("__", "."): v for k, v in extra.items()})
    return ["pretrain"] + [x for k, v in over.items() for x in (f"--{k}", str(v))]


def error_line(capsys, args: list[str], code: int) -> str:
    capsys.readouterr()
    assert main(args) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("lmforge: error: "), err
    return err[0]


def nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """The causal LM's loss is NaN on the given (1-based) optimizer steps (one micro-batch per step)."""
    calls = {"n": 0}
    original = CausalLM.loss

    def loss(self, model, batch):
        out = original(self, model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] in steps:
                return out * torch.tensor(float("nan"), device=out.device)
        return out

    monkeypatch.setattr(CausalLM, "loss", loss)


def all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_a_huge_learning_rate_stops_the_run_in_one_line(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    line = error_line(capsys, argv(tmp_path, corpus, train__lr=1e12, train__min_lr=0, train__max_steps=30,
                                   train__grad_clip=0, eval__every=1), 3)
    assert "training diverged at step" in line and "train.lr (now 1e+12)" in line
    assert "set train.grad_clip (now off)" in line and "train.skip_nonfinite" in line
    # whatever was kept is finite, and the line names only what exists
    if (run / "model.safetensors").is_file():
        assert all_finite(read_weights(run / "model.safetensors")[0])
        assert "the best weights" in line
    else:
        assert "no best weights" in line
    for path in (run / "checkpoints").glob("step_*.pt"):
        assert all_finite(load_checkpoint(path)["model"])
    assert (run / "metrics.jsonl").is_file()  # the history up to the divergence is kept


def test_a_nan_step_stops_the_run_and_names_the_last_good_checkpoint(tmp_path, corpus, capsys, monkeypatch):
    nan_loss_at(monkeypatch, {5})
    line = error_line(capsys, argv(tmp_path, corpus, train__max_steps=8, train__checkpoint_every=2), 3)
    run = tmp_path / "run"
    assert "diverged at step 5: loss nan; the step was not applied" in line
    assert f"the last good checkpoint is {run / 'checkpoints' / STEP_CKPT.format(4)}" in line
    assert "lower train.lr" in line.lower() and "clip harder with train.grad_clip (now 1)" in line
    assert not (run / "checkpoints" / STEP_CKPT.format(6)).exists()
    # the checkpoint resumes: with the NaN gone, the run finishes from step 4
    monkeypatch.undo()
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run)]) == 0
    assert load_checkpoint(run / "checkpoints" / STEP_CKPT.format(8))["step"] == 8


def test_skip_nonfinite_skips_steps_without_applying_them(tmp_path, corpus, capsys, monkeypatch):
    nan_loss_at(monkeypatch, {3, 6})
    capsys.readouterr()
    assert main(argv(tmp_path, corpus, train__max_steps=8, train__skip_nonfinite=2)) == 0
    out = capsys.readouterr().out
    assert "step 3: loss nan; the step was skipped, not applied (1 of train.skip_nonfinite = 2)" in out
    assert "step 6: loss nan; the step was skipped, not applied (2 of train.skip_nonfinite = 2)" in out
    run = tmp_path / "run"
    state = load_checkpoint(run / "checkpoints" / STEP_CKPT.format(8))
    # AdamW counts the steps it applied: 8 taken, 2 skipped
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {6.0}
    assert state["skipped"] == 2 and all_finite(state["model"])
    assert [r["step"] for r in read_metrics(run, "skipped")] == [3, 6]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run, "train"))

    # one more than allowed stops the run, saying the allowance is used up
    nan_loss_at(monkeypatch, {2, 4})
    line = error_line(capsys, argv(tmp_path, corpus, train__max_steps=6, train__skip_nonfinite=1,
                                   log__run_dir=str(tmp_path / "run2")), 3)
    assert "diverged at step 4" in line and "all 1 skips that train.skip_nonfinite allows are used" in line


def test_a_nonfinite_gradient_norm_is_not_applied(tmp_path, corpus, capsys, monkeypatch):
    """A finite loss whose gradients overflow (norm inf) is not stepped on either."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(parameters, max_norm, *args, **kwargs):
        calls["n"] += 1
        norm = real_clip(parameters, max_norm, *args, **kwargs)
        return norm * float("inf") if calls["n"] == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert main(argv(tmp_path, corpus, train__max_steps=3, train__skip_nonfinite=1)) == 0
    assert "step 2: gradient norm inf; the step was skipped" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / STEP_CKPT.format(3))
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {2.0}


def test_weights_driven_to_infinity_are_never_kept(tmp_path, corpus, capsys, monkeypatch):
    """A step with a finite loss and norm that still leaves an infinite weight stops the run at the next
    evaluation or checkpoint; the best weights and checkpoints before it stay finite."""
    real_apply = loop.Trainer._apply_step

    def apply_step(self):
        real_apply(self)
        if self.state.step == 3:  # step 4 (0-based 3) leaves an infinity behind, after its finite loss
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).view(-1)[0] = float("inf")

    monkeypatch.setattr(loop.Trainer, "_apply_step", apply_step)
    run = tmp_path / "run"
    line = error_line(capsys, argv(tmp_path, corpus, train__max_steps=6, eval__every=2, train__checkpoint_every=2), 3)
    assert "diverged at step 4: the weights are no longer finite" in line
    assert f"the best weights {run / 'model.safetensors'} (step 2)" in line
    weights, metadata = read_weights(run / "model.safetensors")
    assert metadata["step"] == "2" and all_finite(weights)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [STEP_CKPT.format(2)]


def test_the_summary_names_only_weights_that_exist(tmp_path, corpus, capsys, monkeypatch):
    """No evaluation scored a finite loss: no model.safetensors, and the summary says so."""
    monkeypatch.setattr(CausalLM, "evaluate", lambda self, model, to_device: {"loss": float("nan")})
    capsys.readouterr()
    assert main(argv(tmp_path, corpus, train__max_steps=2)) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert "weights:       none saved" in out and "model.safetensors" not in out


def test_inference_refuses_weights_that_are_not_finite(tmp_path, corpus, capsys):
    assert main(argv(tmp_path, corpus, train__max_steps=2)) == 0
    run = tmp_path / "run"
    weights, metadata = read_weights(run / "model.safetensors")
    name = sorted(weights)[1]
    weights[name][0] = float("nan")
    save_weights(weights, run / "model.safetensors", metadata)
    line = error_line(capsys, ["generate", "--checkpoint", str(run), "--max-new-tokens", "4"], 2)
    assert "model.safetensors: 1 of" in line and "NaN or infinite" in line and "diverged" in line
    line = error_line(capsys, ["export", str(run), str(tmp_path / "out")], 2)
    assert "NaN or infinite" in line and not (tmp_path / "out").exists()
