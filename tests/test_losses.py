"""Every loss against torch.nn.functional or its formula, values and gradients; the chunked
linear+cross-entropy against the plain logits + cross-entropy for every combination of options, and
its hand-written backward under float64 gradcheck."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge import losses
from lmforge.config import LOSS_NAMES, LOSS_OPTIONS, LossConfig
from lmforge.losses import (IGNORE_INDEX, LOSSES, binary_cross_entropy, binary_focal, cross_entropy, focal, hinge,
                            hinge_crammer_singer, hinge_weston_watkins, huber, linear_cross_entropy, loss_options,
                            mae, mse, smooth_l1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def grads(value, inputs):
    return torch.autograd.grad(value, inputs)


def assert_same(got, want, inputs, **tol):
    """Equal values and equal gradients with respect to `inputs`."""
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(grads(got, inputs), grads(want, inputs)):
        torch.testing.assert_close(a, b, **tol)


# -- the worked examples of docs/losses-and-optimizers.md -------------------------------------------


def test_worked_example_mse():
    assert mse(torch.tensor([1.2, 1.8, 3.5]), torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(0.11)


def test_worked_example_cross_entropy():
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    loss = cross_entropy(probs.log(), torch.tensor([0, 1]))  # logits = log-probabilities
    assert loss.item() == pytest.approx(0.29, abs=5e-3)
    assert loss.item() == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)


# -- cross-entropy ---------------------------------------------------------------------------------


def ce_inputs(n=24, v=7, seed=0, dtype=torch.float64):
    g = gen(seed)
    logits = (3 * torch.randn(n, v, generator=g, dtype=dtype)).requires_grad_()
    targets = torch.randint(v, (n,), generator=g)
    targets[[1, 5, 6]] = IGNORE_INDEX
    weights = torch.rand(v, generator=g, dtype=dtype) + 0.2
    return logits, targets, weights


@pytest.mark.parametrize("smoothing,weighted,reduction", list(itertools.product([0.0, 0.2], [False, True], ["mean", "sum"])))
def test_cross_entropy_matches_torch(smoothing, weighted, reduction):
    logits, targets, weights = ce_inputs()
    w = weights if weighted else None
    got = cross_entropy(logits, targets, label_smoothing=smoothing, class_weights=w, reduction=reduction)
    want = F.cross_entropy(logits, targets, weight=w, label_smoothing=smoothing, ignore_index=IGNORE_INDEX,
                           reduction=reduction)
    assert_same(got, want, [logits])


def test_cross_entropy_z_loss_and_softcap_follow_their_formulas():
    logits, targets, weights = ce_inputs()
    z, cap = 1e-2, 2.5
    got = cross_entropy(logits, targets, z_loss=z, softcap=cap, class_weights=weights)
    capped = cap * torch.tanh(logits / cap)
    real = targets != IGNORE_INDEX
    w_y = weights[targets[real]]
    nll = -F.log_softmax(capped[real], -1).gather(1, targets[real][:, None]).squeeze(1)
    zl = z * torch.logsumexp(capped[real], -1).square()
    want = (w_y * (nll + zl)).sum() / w_y.sum()  # the z-loss is weighted and averaged like the main loss
    assert_same(got, want, [logits])
    # 3-D logits [B, T, V] and targets [B, T] are flattened
    torch.testing.assert_close(cross_entropy(logits.reshape(4, 6, 7), targets.reshape(4, 6), z_loss=z),
                               cross_entropy(logits, targets, z_loss=z))


def test_cross_entropy_with_nothing_to_score_is_zero():
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.full((3,), IGNORE_INDEX)
    loss = cross_entropy(logits, targets, z_loss=1e-3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_bf16_logits_are_upcast():
    logits, targets, _ = ce_inputs(dtype=torch.float32)
    got = cross_entropy(logits.detach().bfloat16(), targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.cross_entropy(logits.detach().bfloat16().float(), targets))


# -- chunked linear + cross-entropy ----------------------------------------------------------------

OPTION_GRID = list(itertools.product([0.0, 0.1], [0.0, 1e-3], [0.0, 5.0], [False, True], ["mean", "sum"], [False, True]))


@pytest.mark.parametrize("smoothing,z,cap,weighted,reduction,bias", OPTION_GRID)
def test_chunked_linear_cross_entropy_equals_naive(smoothing, z, cap, weighted, reduction, bias):
    """fp32, every combination of options; chunks of 5 rows over 40 rows, one of them entirely ignored."""
    g = gen(1)
    n, d, v = 40, 16, 29
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(v, d, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).requires_grad_() if bias else None
    targets = torch.randint(v, (n,), generator=g)
    targets[10:20] = IGNORE_INDEX  # two whole chunks of ignored rows...
    targets[[0, 33, 39]] = IGNORE_INDEX  # ...and scattered ones
    options = dict(label_smoothing=smoothing, z_loss=z, softcap=cap, reduction=reduction,
                   class_weights=torch.rand(v, generator=g) + 0.5 if weighted else None)
    inputs = [hidden, weight] + ([b] if bias else [])
    got = linear_cross_entropy(hidden, weight, targets, b, chunk_rows=5, **options)
    want = cross_entropy(F.linear(hidden, weight, b), targets, **options)
    assert_same(got, want, inputs, rtol=1e-5, atol=1e-5)


def test_chunked_gradcheck_float64():
    g = gen(2)
    hidden = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(7, (11,), generator=g)
    targets[[2, 3]] = IGNORE_INDEX
    weights = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    for options in (dict(), dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, class_weights=weights)):
        fn = lambda h, w, b: linear_cross_entropy(h, w, targets, b, chunk_rows=3, **options)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_chunked_with_every_target_ignored_is_zero():
    hidden, weight = torch.randn(12, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    targets = torch.full((12,), IGNORE_INDEX)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=1, label_smoothing=0.1, z_loss=1e-3)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_chunked_scaled_backward_and_no_grad_path():
    """A scaled loss (the loop's loss_sum / n_targets) scales the gradients; without grad it only scores."""
    g = gen(3)
    hidden = torch.randn(30, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    targets = torch.randint(13, (30,), generator=g)
    got = linear_cross_entropy(hidden, weight, targets, reduction="sum", chunk_rows=4) / 7.0
    want = cross_entropy(hidden @ weight.t(), targets, reduction="sum") / 7.0
    assert_same(got, want, [hidden, weight], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        scored = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    assert scored.grad_fn is None
    torch.testing.assert_close(scored, cross_entropy(hidden @ weight.t(), targets).detach())


def test_chunked_under_bf16_autocast_matches_naive_autocast():
    g = gen(4)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = (0.2 * torch.randn(50, 32, generator=g)).requires_grad_()
    targets = torch.randint(50, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden.bfloat16(), weight, targets, chunk_rows=16, label_smoothing=0.1)
        want = cross_entropy(F.linear(hidden.bfloat16(), weight), targets, label_smoothing=0.1)
    assert got.dtype == torch.float32
    assert_same(got, want, [hidden, weight], rtol=2e-2, atol=2e-2)
    assert grads(linear_cross_entropy(hidden, weight, targets, chunk_rows=16), [weight])[0].dtype == torch.float32


def test_unchunked_when_small_or_switched_off(monkeypatch):
    calls = []
    real_apply = losses._LinearCrossEntropy.apply
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real_apply(*a))
    h, w, t = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3), torch.randint(5, (4,))
    linear_cross_entropy(h, w, t)  # 4 rows: far below one chunk
    linear_cross_entropy(h, w, t, chunked=False, chunk_rows=1)
    assert calls == []
    linear_cross_entropy(h, w, t, chunk_rows=3)
    assert calls == [1]


# -- binary, multi-label and focal -----------------------------------------------------------------


@pytest.mark.parametrize("pos_weight", [None, "per-label"])
def test_binary_cross_entropy_multi_label_matches_torch(pos_weight):
    g = gen(5)
    logits = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(10, 4, generator=g) > 0.5).double()
    pw = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64) if pos_weight else None
    for reduction in ("mean", "sum"):
        assert_same(binary_cross_entropy(logits, targets, pos_weight=pw, reduction=reduction),
                    F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pw, reduction=reduction), [logits])


def test_binary_focal_formula_and_reductions():
    g = gen(6)
    logits = torch.randn(20, 3, generator=g, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(20, 3, generator=g) > 0.3).double()
    p = torch.sigmoid(logits)
    p_t = torch.where(targets == 1, p, 1 - p)
    a_t = torch.where(targets == 1, 0.25, 0.75)
    want = (-a_t * (1 - p_t) ** 2 * p_t.log()).mean()
    assert_same(binary_focal(logits, targets, gamma=2.0, alpha=0.25), want, [logits])
    # gamma 0 without alpha is plain binary cross-entropy
    assert_same(binary_focal(logits, targets, gamma=0.0, alpha=None, reduction="sum"),
                F.binary_cross_entropy_with_logits(logits, targets, reduction="sum"), [logits])


def test_binary_focal_hand_computed():
    # p = sigmoid(0) = 0.5 for a positive, gamma 2, alpha 0.25: 0.25 * 0.5^2 * ln 2
    loss = binary_focal(torch.tensor([0.0]), torch.tensor([1.0]), gamma=2.0, alpha=0.25)
    assert loss.item() == pytest.approx(0.25 * 0.25 * math.log(2))


def test_focal_multiclass():
    logits, targets, weights = ce_inputs(seed=7)
    assert_same(focal(logits, targets, gamma=0.0, reduction="sum"),
                F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"), [logits])
    real = targets != IGNORE_INDEX
    p_y = F.softmax(logits[real], -1).gather(1, targets[real][:, None]).squeeze(1)
    want = (-weights[targets[real]] * (1 - p_y) ** 1.5 * p_y.log()).mean()
    assert_same(focal(logits, targets, gamma=1.5, class_weights=weights), want, [logits])
    # by hand: probabilities (0.5, 0.25, 0.25), true class 0, gamma 2 -> 0.5^2 * ln 2
    hand = focal(torch.tensor([[0.5, 0.25, 0.25]]).log(), torch.tensor([0]), gamma=2.0)
    assert hand.item() == pytest.approx(0.25 * math.log(2))


# -- regression ------------------------------------------------------------------------------------


def reg_inputs():
    g = gen(8)
    pred = (2 * torch.randn(50, generator=g, dtype=torch.float64)).requires_grad_()
    return pred, 2 * torch.randn(50, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_regression_losses_match_torch(reduction):
    pred, target = reg_inputs()
    assert_same(mse(pred, target, reduction=reduction), F.mse_loss(pred, target, reduction=reduction), [pred])
    assert_same(mae(pred, target, reduction=reduction), F.l1_loss(pred, target, reduction=reduction), [pred])
    for delta in (0.5, 1.0, 2.0):
        assert_same(huber(pred, target, delta=delta, reduction=reduction),
                    F.huber_loss(pred, target, delta=delta, reduction=reduction), [pred])
        assert_same(smooth_l1(pred, target, delta=delta, reduction=reduction),
                    F.smooth_l1_loss(pred, target, beta=delta, reduction=reduction), [pred])


def test_huber_hand_computed():
    # residuals 0.5 (quadratic: 0.125) and 3 (linear: 1 * (3 - 0.5) = 2.5), delta 1
    assert huber(torch.tensor([0.5, 3.0]), torch.zeros(2)).item() == pytest.approx((0.125 + 2.5) / 2)


# -- hinge -----------------------------------------------------------------------------------------


def test_binary_hinge_both_label_conventions():
    scores = torch.tensor([2.0, 0.3, -0.5, -2.0])
    # margin 1: y=+1, s=2 -> 0; y=+1, s=0.3 -> 0.7; y=-1, s=-0.5 -> 0.5; y=-1, s=-2 -> 0
    want = (0 + 0.7 + 0.5 + 0) / 4
    assert hinge(scores, torch.tensor([1, 1, -1, -1])).item() == pytest.approx(want)
    assert hinge(scores, torch.tensor([1, 1, 0, 0])).item() == pytest.approx(want)
    assert hinge(scores, torch.tensor([1, 1, 0, 0]), margin=2.0, reduction="sum").item() == pytest.approx(1.7 + 1.5)
    with pytest.raises(ValueError, match="labels must be -1/\\+1 or 0/1, got 2"):
        hinge(scores, torch.tensor([1, 2, 0, 0]))


def test_multiclass_hinge_hand_computed():
    scores = torch.tensor([[3.0, 2.5, 0.0], [0.0, 1.0, 0.2]])
    labels = torch.tensor([0, 2])
    # row 0, true 0: margins to classes 1, 2 are max(0, 1 + 2.5 - 3) = 0.5 and max(0, 1 + 0 - 3) = 0
    # row 1, true 2: max(0, 1 + 0 - 0.2) = 0.8 and max(0, 1 + 1 - 0.2) = 1.8
    assert hinge_crammer_singer(scores, labels, reduction="sum").item() == pytest.approx(0.5 + 1.8)
    assert hinge_weston_watkins(scores, labels, reduction="sum").item() == pytest.approx(0.5 + 0.8 + 1.8)


def test_weston_watkins_is_c_times_torch_multi_margin():
    g = gen(9)
    scores = torch.randn(16, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(5, (16,), generator=g)
    assert_same(hinge_weston_watkins(scores, labels, margin=0.7), 5 * F.multi_margin_loss(scores, labels, margin=0.7),
                [scores])


# -- the registry and the config -------------------------------------------------------------------


def test_every_configured_loss_has_a_function_taking_its_options():
    assert set(LOSSES) == set(LOSS_NAMES) - {"auto"} == set(LOSS_OPTIONS)
    for name, fn in LOSSES.items():
        params = inspect.signature(fn).parameters
        assert "reduction" in params, name
        for option in LOSS_OPTIONS[name]:
            assert option in params, (name, option)
            assert hasattr(LossConfig(), option), option


def test_loss_options_from_config():
    lc = LossConfig(name="cross_entropy", label_smoothing=0.1, class_weights=[1.0, 2.0])
    opts = loss_options(lc)
    assert set(opts) == {"label_smoothing", "z_loss", "softcap", "class_weights"}
    torch.testing.assert_close(opts["class_weights"], torch.tensor([1.0, 2.0]))
    assert loss_options(LossConfig(name="mse")) == {}
    assert loss_options(LossConfig(name="huber", delta=0.5)) == {"delta": 0.5}


# -- the fused loss on every device -----------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# (smoothing, z-loss, softcap, class weights, bias): each option alone, then all of them together
DEVICE_OPTIONS = [(0.0, 0.0, 0.0, False, False), (0.1, 0.0, 0.0, False, True), (0.0, 1e-3, 0.0, False, False),
                  (0.0, 0.0, 5.0, False, True), (0.0, 0.0, 0.0, True, False), (0.1, 1e-3, 5.0, True, True)]


def fused_case(device: str, seed: int, bias: bool, weighted: bool, n: int = 300, d: int = 32, v: int = 97):
    """hidden, weight, bias, targets and class weights on `device`: a third of the rows ignored, some in
    runs that span whole chunks."""
    g = gen(seed)
    hidden = torch.randn(n, d, generator=g).to(device).requires_grad_()
    weight = (0.3 * torch.randn(v, d, generator=g)).to(device).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).to(device).requires_grad_() if bias else None
    targets = torch.randint(v, (n,), generator=g)
    targets[40:120] = IGNORE_INDEX
    targets[torch.randperm(n, generator=g)[:20]] = IGNORE_INDEX
    cw = (torch.rand(v, generator=g) + 0.5).to(device) if weighted else None
    return hidden, weight, b, targets.to(device), cw


# the chunk math as each device runs it by default, and on CUDA eager too (compiled=None: the default)
FUSED_PATHS = [pytest.param("cpu", None, id="cpu"),
               pytest.param("cuda", False, id="cuda-eager", marks=pytest.mark.gpu),
               pytest.param("cuda", None, id="cuda-compiled", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,compiled", FUSED_PATHS)
@pytest.mark.parametrize("smoothing,z,cap,weighted,bias", DEVICE_OPTIONS)
def test_fused_equals_unfused_on_device_fp32(device, compiled, smoothing, z, cap, weighted, bias):
    """fp32 on `device`, chunks of 64 rows, an upstream gradient other than 1 (the loop divides each
    loss by its token count): values and gradients to 1e-5."""
    hidden, weight, b, targets, cw = fused_case(device, 11, bias, weighted)
    options = dict(label_smoothing=smoothing, z_loss=z, softcap=cap, class_weights=cw, reduction="sum")
    inputs = [hidden, weight] + ([b] if bias else [])
    got = linear_cross_entropy(hidden, weight, targets, b, chunk_rows=64, compiled=compiled, **options) / 37.0
    want = cross_entropy(F.linear(hidden, weight, b), targets, **options) / 37.0
    assert got.device.type == device
    assert_same(got, want, inputs, rtol=1e-5, atol=1e-5)
    assert not losses.COMPILE_FAILED  # the compiled case really ran compiled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("smoothing,z,cap,weighted,bias", DEVICE_OPTIONS)
def test_fused_equals_unfused_on_device_bf16_autocast(device, smoothing, z, cap, weighted, bias):
    """Under bf16 autocast both paths run their matmuls in bf16 and the softmax in fp32; they agree to
    bf16's rounding of the logits and gradients."""
    hidden, weight, b, targets, cw = fused_case(device, 12, bias, weighted)
    options = dict(label_smoothing=smoothing, z_loss=z, softcap=cap, class_weights=cw)
    inputs = [hidden, weight] + ([b] if bias else [])
    with torch.autocast(device, dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets, b, chunk_rows=64, **options) * 3.0
        want = cross_entropy(F.linear(hidden, weight, b), targets, **options) * 3.0
    assert got.dtype == torch.float32
    assert_same(got, want, inputs, rtol=2e-2, atol=2e-2)


def test_chunk_size_follows_the_device(monkeypatch):
    """Chunks of CHUNK_ELEMENTS / V rows for the device at hand (a GPU takes far larger ones)."""
    seen = []
    real_apply = losses._LinearCrossEntropy.apply
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda *a: seen.append(a[-1][6]) or real_apply(*a))
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", {"cpu": 128 * 50, "cuda": 1 << 26})
    h, w, t = torch.randn(400, 8, requires_grad=True), torch.randn(50, 8), torch.randint(50, (400,))
    linear_cross_entropy(h, w, t).backward()
    assert seen == [losses.MIN_CHUNK_ROWS]
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", {"cpu": 300 * 50, "cuda": 1})
    linear_cross_entropy(h, w, t)
    assert seen[-1] == 300


def test_chunk_math_falls_back_to_eager_where_compiling_fails(monkeypatch):
    """Compiling the chunk math needs Triton on a GPU: where it fails, one warning and the same loss."""
    def broken(*args, **kwargs):
        raise RuntimeError("no working Triton here\nsecond line")

    monkeypatch.setattr(losses, "_compiled_chunk_math", broken)
    monkeypatch.setattr(losses, "COMPILE_FAILED", [])
    hidden, weight, b, targets, cw = fused_case("cpu", 13, True, True)
    with pytest.warns(UserWarning, match="compiling the chunk math failed .RuntimeError: no working Triton here."):
        got = linear_cross_entropy(hidden, weight, targets, b, chunk_rows=64, compiled=True, class_weights=cw)
    assert_same(got, cross_entropy(F.linear(hidden, weight, b), targets, class_weights=cw), [hidden, weight, b],
                rtol=1e-5, atol=1e-5)
    assert losses.COMPILE_FAILED == ["RuntimeError: no working Triton here"]
