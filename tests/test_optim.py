"""Optimizers by name, their parameter groups and the learning-rate schedules.

Oracles: torch's own optimizers built by hand with the same hyperparameters (the factory must pass
every option through), and each schedule's formula evaluated at chosen steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import GPT
from lmforge import optim
from lmforge.optim import OptimizerChain, build_optimizer, lr_at, lr_factor, param_groups, set_lr


def tiny_gpt(**extra) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, max_seq_len=16, n_layer=2, n_head=2, d_model=32, **extra))


# -- schedules -------------------------------------------------------------------------------------


def test_warmup_and_cosine_hit_their_documented_values():
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=111)
    assert lr_at(0, tc) == pytest.approx(1e-4)  # warmup starts at lr / warmup_steps
    assert lr_at(4, tc) == pytest.approx(5e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)  # the peak at the end of warmup
    assert lr_at(10, tc) == pytest.approx(1e-3)  # decay starts from the peak
    assert lr_at(60, tc) == pytest.approx(5.5e-4)  # cosine midpoint: halfway between lr and min_lr
    assert lr_at(35, tc) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, tc) == pytest.approx(1e-4)  # the floor at the last step
    assert lr_at(500, tc) == pytest.approx(1e-4)
    decay = [lr_at(s, tc) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    no_warmup = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=3)
    assert [lr_at(s, no_warmup) for s in range(3)] == pytest.approx([1e-3, 5e-4, 0.0])


@pytest.mark.parametrize("schedule,expected", [
    ("linear", {10: 1e-3, 35: 1e-4 + 9e-4 * 0.75, 60: 5.5e-4, 110: 1e-4}),
    ("constant", {5: 6e-4, 10: 1e-3, 110: 1e-3}),
    # wsd, decay_fraction 0.2 of the 101 post-warmup steps: flat until step 111 - 20 = 91, then linear to the floor
    ("wsd", {10: 1e-3, 90: 1e-3, 91: 1e-3, 100: 1e-4 + 9e-4 * (1 - 9 / 19), 110: 1e-4}),
    # inverse square root of the step after warmup: lr * sqrt(10 / (step + 1)), floored at min_lr
    ("inverse_sqrt", {9: 1e-3, 39: 1e-3 * 0.5, 89: 1e-3 / 3, 999: 1e-4, 5000: 1e-4}),
])
def test_schedules_hit_their_documented_values(schedule, expected):
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=111, schedule=schedule)
    for step, lr in expected.items():
        assert lr_at(step, tc) == pytest.approx(lr, rel=1e-12), step
    assert lr_at(4, tc) == pytest.approx(5e-4)  # every schedule shares the linear warmup
    values = [lr_at(s, tc) for s in range(9, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises after the peak
    assert min(values) >= tc.min_lr - 1e-15


def started(**fields) -> TrainConfig:
    """A TrainConfig as a fresh run records it (its schedule's horizon set)."""
    tc = TrainConfig(**fields)
    optim.start_schedule(tc)
    return tc


@pytest.mark.parametrize("schedule,after", [("cosine", 1e-4), ("linear", 1e-4), ("wsd", 1e-4), ("constant", 1e-3),
                                            ("inverse_sqrt", None)])
def test_extending_a_run_keeps_its_schedule(schedule, after):
    """A resume with a larger max_steps: the steps that ran keep their lr, and the lr just past the old end is
    the schedule's end value (min_lr; constant: lr; inverse_sqrt decays on), not a jump back up."""
    tc = started(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, schedule=schedule)
    before = [lr_at(s, tc) for s in range(100)]
    tc.max_steps = 200
    said = optim.extend_schedule(tc, 100)
    assert [lr_at(s, tc) for s in range(100)] == before
    if after is None:  # inverse_sqrt: the same formula, continued
        assert [lr_at(s, tc) for s in (100, 150, 199)] == pytest.approx([1e-3 * math.sqrt(10 / (s + 1))
                                                                         for s in (100, 150, 199)])
        assert "steps 101-200 continue the inverse-square-root decay" in said
        return
    assert lr_at(100, tc) == pytest.approx(after) and before[-1] == pytest.approx(after)
    assert {lr_at(s, tc) for s in range(100, 200)} == {lr_at(100, tc)}
    assert tc.schedule_steps == 100 and tc.schedule_restarts == []
    if schedule == "cosine":
        assert said == ("from 100 to 200 steps: the schedule keeps its horizon of 100 steps; steps 101-200 run at "
                        "min_lr 0.0001 (train.schedule_restart true starts a new warmup and decay)")


def test_schedule_restart_warms_up_again_from_the_resume_step():
    tc = started(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, schedule="cosine", schedule_restart=True)
    before = [lr_at(s, tc) for s in range(100)]
    tc.max_steps = 300
    said = optim.extend_schedule(tc, 100)
    assert tc.schedule_restarts == [[100, 300]]
    assert [lr_at(s, tc) for s in range(100)] == before  # what ran stays as it ran (and is drawn so)
    assert lr_at(100, tc) == pytest.approx(1e-4)  # a new warmup: lr / warmup_steps at its first step
    assert lr_at(109, tc) == pytest.approx(1e-3)  # the peak at its end
    assert lr_at(200, tc) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 90 / 189)))
    assert lr_at(299, tc) == pytest.approx(1e-4)  # decayed to min_lr at the new max_steps
    assert said == ("from 100 to 300 steps: train.schedule_restart starts a new schedule at step 101: 10 warmup "
                    "steps to lr 0.001, then cosine to step 300")
    assert optim.extend_schedule(tc, 150) is None  # resumed again within the new horizon: nothing to restart


def test_warmup_as_long_as_the_run_is_clamped_to_a_tenth_of_it():
    """A smoke test (max_steps 2 with the default warmup of 50) trains: the warmup is cut to a tenth of the
    schedule, rounded down, with a note, and the config records the warmup used."""
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, max_steps=2)
    assert optim.start_schedule(tc) == ["train.warmup_steps = 50 is not below the schedule's 2 steps; warming up "
                                        "for 0 steps (a tenth of them, rounded down) instead"]
    assert tc.warmup_steps == 0 and lr_at(0, tc) == pytest.approx(1e-3)
    unclamped = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=50, max_steps=30)  # the schedule clamps it too
    assert lr_at(0, unclamped) == pytest.approx(1e-3 / 3) and lr_at(2, unclamped) == pytest.approx(1e-3)
    assert optim.start_schedule(TrainConfig(warmup_steps=5, max_steps=30)) == []  # a warmup that fits is left alone


def test_set_lr_scales_every_group_by_its_peak():
    tc = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=3, max_steps=12, lr_scale={"blocks.0.*": 0.5})
    model = tiny_gpt()
    opt = build_optimizer(model, tc)
    for step in range(12):
        set_lr(opt, step, tc)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["peak_lr"] * lr_factor(step, tc), rel=1e-12)
    scales = sorted({g["peak_lr"] / tc.lr for g in opt.param_groups})
    assert scales == pytest.approx([0.5, 1.0])


# -- parameter groups ------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [dict(), dict(tie_embeddings=False), dict(norm="rmsnorm", bias=False, pos="rope")])
def test_param_groups_decay_only_weight_matrices(extra):
    model = tiny_gpt(**extra)
    groups = param_groups(model, TrainConfig(weight_decay=0.1))
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    decay = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}  # each exactly once

    for name, p in model.named_parameters(remove_duplicate=False):
        is_matrix_weight = name.endswith("weight") and any(k in name for k in ("qkv", "proj", "up", "down"))
        if name == "head.weight" and not model.cfg.tie_embeddings:
            is_matrix_weight = True
        assert (id(p) in decay) == is_matrix_weight, name


@pytest.mark.parametrize("extra", [dict(), dict(tie_embeddings=False, bias=True, pos="learned"),
                                   dict(mlp="swiglu", n_kv_head=1)])
def test_muon_groups_cover_every_parameter_exactly_once(extra):
    model = tiny_gpt(**extra)
    tc = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02)
    opt = build_optimizer(model, tc)
    assert isinstance(opt, OptimizerChain)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = [id(p) for g in muon.param_groups for p in g["params"]]
    in_adamw = [id(p) for g in adamw.param_groups for p in g["params"]]
    everything = in_muon + in_adamw
    assert len(everything) == len(set(everything)) and set(everything) == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        hidden_matrix = p.ndim == 2 and name.startswith("blocks.")
        assert (id(p) in in_muon) == hidden_matrix, name
    assert all(g["lr"] == 0.02 for g in muon.param_groups) and all(g["lr"] == 3e-3 for g in adamw.param_groups)
    assert {g["weight_decay"] for g in muon.param_groups} == {0.1}

    # the chain steps both, and its state round-trips
    model(torch.randint(50, (2, 8))).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    clone = build_optimizer(copy.deepcopy(model), tc)
    clone.load_state_dict(opt.state_dict())
    assert len(clone.state) == len(opt.state) > 0


def test_layer_decay_and_lr_scale_multipliers():
    model = tiny_gpt(tie_embeddings=False)
    tc = TrainConfig(lr=1.0, layer_decay=0.5, lr_scale={"*.attn.*": 2.0, "head.*": 3.0})
    peak = {n: g["peak_lr"] for g in param_groups(model, tc) for n in g["param_names"]}
    # 2 blocks: embeddings are layer 0, block i is layer i + 1, the final norm and head are layer 3
    assert peak["tok_emb.weight"] == pytest.approx(0.5 ** 3)
    assert peak["blocks.0.mlp.up.weight"] == pytest.approx(0.5 ** 2)
    assert peak["blocks.1.mlp.up.weight"] == pytest.approx(0.5)
    assert peak["blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** 2 * 2.0)
    assert peak["norm.weight"] == pytest.approx(1.0)
    assert peak["head.weight"] == pytest.approx(3.0)


# -- every optimizer against torch's own ---------------------------------------------------------


def _reference(name: str, params, tc):
    """The torch optimizer the config means, built by hand (one group, no decay exemptions)."""
    groups = [{"params": params, "weight_decay": tc.weight_decay}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, dampening=tc.dampening, nesterov=tc.nesterov)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=tc.lr, alpha=tc.beta2, eps=tc.eps, momentum=tc.momentum)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=tc.lr, eps=tc.eps)
    raise AssertionError(name)


class Matrix(nn.Module):
    """Only a weight matrix, so every parameter is decayed and one group holds it all."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return (x @ self.w.t()).tanh().sum()


@pytest.mark.parametrize("name,extra", [
    ("adamw", {}), ("adam", {}), ("sgd", {"momentum": 0.8, "nesterov": True}),
    ("sgd", {"momentum": 0.9, "dampening": 0.3}), ("sgd", {"momentum": 0.0}),
    ("rmsprop", {"momentum": 0.5}), ("adagrad", {}),
])
def test_each_optimizer_equals_torch_with_the_same_options(name, extra):
    tc = TrainConfig(optimizer=name, lr=0.05, weight_decay=0.01, beta2=0.9, eps=1e-6, **extra)
    ours, ref = Matrix(), Matrix()
    opt, ref_opt = build_optimizer(ours, tc), _reference(name, list(ref.parameters()), tc)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).backward()
            o.step()
    torch.testing.assert_close(ours.w, ref.w, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours.w, Matrix().w)


def test_muon_equals_torch_muon_plus_adamw():
    model = tiny_gpt()
    ref = copy.deepcopy(model)
    tc = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, muon_momentum=0.9, weight_decay=0.05)
    opt = build_optimizer(model, tc)
    hidden = [p for n, p in ref.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
    rest = [p for n, p in ref.named_parameters() if not (p.ndim == 2 and n.startswith("blocks."))]
    # the rest is the tied embedding/head and 1-D norm weights: none of them decayed
    ref_opts = [torch.optim.Muon(hidden, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05),
                torch.optim.AdamW(rest, lr=3e-3, betas=(tc.beta1, tc.beta2), eps=tc.eps, weight_decay=0.0, fused=True)]
    x = torch.randint(50, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        for o in ref_opts:
            o.zero_grad()
        ref(x).logsumexp(-1).mean().backward()
        for o in ref_opts:
            o.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
