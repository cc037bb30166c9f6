"""The losses at the end of a network. Each is a plain function of (predictions, targets, options)
with `reduction="mean"` (over real targets) or `"sum"`; the training loop asks for sums and divides
by the real target count of the whole accumulated step. `LOSSES` maps the config's `loss.name` to
the function; `docs/losses-and-optimizers.md` says when to use which.

Low-precision inputs (bf16/fp16 under autocast) are upcast to fp32 before any softmax or reduction.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets with this id carry no loss

# The chunked linear+CE works on about this many logits at a time, but on at least MIN_CHUNK_ROWS
# rows: each chunk adds into the whole [V, d] weight gradient, and at a large vocabulary that
# read-modify-write must stay a small part of the chunk's matmuls (128 rows at 128k = 64 MiB of
# logits: 0.86x the naive time on a CPU, measured by benchmarks/linear_ce_memory.py).
# CPU: 4M logits (16 MiB in fp32), which stays near the caches. CUDA: 64M (256 MiB): a GPU runs a
# chunk's kernels in microseconds, so with small chunks the launches and the per-chunk [V, d]
# read-modify-write dominate (128-row chunks made the GPT-2-small step 2.4x slower than the unfused
# loss on an H100); a few large chunks still keep a fraction of the unfused loss's N x V logits.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
MIN_CHUNK_ROWS = 128


def _reduce(total: torch.Tensor, denom: torch.Tensor | int, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(denom, torch.Tensor):
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # no real targets: 0, not 0/0
        return total / denom
    return total / max(denom, 1)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# -- the cross-entropy family ----------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0,
                  class_weights: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy, logits [..., V] and class-index targets [...].

    With s = c * tanh(x / c) when `softcap` c > 0 (else s = x), lse = logsumexp(s), weights w (all 1
    without `class_weights`) and label smoothing e, a real target y contributes

        w_y * (1 - e) * (lse - s_y)  +  (e / V) * sum_j w_j * (lse - s_j)  +  z * w_y * lse^2

    (torch's label-smoothing convention; the last term is the z-loss of PaLM, weighted and averaged
    like the main loss). "mean" divides the sum over real targets by the sum of w_y over them (their
    count without weights), like `F.cross_entropy`; targets equal to `ignore_index` contribute
    nothing, and a batch with none gives 0.
    """
    vocab = logits.shape[-1]
    logits, targets = _fp32(logits.reshape(-1, vocab)), targets.reshape(-1)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    total = F.cross_entropy(logits, targets, weight=class_weights, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction="sum")
    real = targets != ignore_index
    w_y = class_weights[targets[real]] if class_weights is not None else None
    if z_loss:
        lse2 = torch.logsumexp(logits[real], dim=-1).square()
        total = total + z_loss * (lse2 * w_y if w_y is not None else lse2).sum()
    return _reduce(total, w_y.sum() if w_y is not None else real.sum(), reduction)


def _chunk_loss_and_grad(raw: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, wy: torch.Tensor,
                         cw: torch.Tensor | None, scale: torch.Tensor, weight_sum: torch.Tensor | int, *,
                         smoothing: float, z_loss: float, softcap: float, grad_dtype: torch.dtype | None,
                         bias_grad: bool):
    """The loss's math on one chunk of rows: raw = h @ W^T [rows, V] in the compute dtype, y the rows'
    targets, wy their class weights, cw all class weights (None: all 1) and weight_sum their sum.
    Returns (the chunk's summed loss, d loss / d logits times `scale` in `grad_dtype` or None when
    no gradient is wanted, the bias gradient's share or None).

    In place wherever it can be: in eager mode one [rows, V] buffer in the accumulation dtype serves
    the whole chunk. Compiled on CUDA (`_chunk_math`), where its dozen elementwise passes become a
    few fused kernels; torch.compile turns the in-place ops into the same fused code.
    """
    acc = scale.dtype
    vocab = raw.shape[1]
    logits = raw.to(acc)
    if bias is not None:
        logits.add_(bias)  # `raw` is the chunk's own matmul output: free to overwrite
    tanh = None
    if softcap:
        tanh = logits.div_(softcap).tanh_()  # kept for the chain rule
        logits = tanh * softcap
    s_y = logits.gather(1, y[:, None]).squeeze(1)
    # sum_j w_j s_j for the smoothing term, taken before the softmax overwrites `logits`
    s_dot = (logits @ cw if cw is not None else logits.sum(1)) if smoothing else 0.0
    top = logits.amax(1, keepdim=True)
    probs = logits.sub_(top).exp_()
    norm = probs.sum(1, keepdim=True)
    probs.div_(norm)
    lse = (top + norm.log()).squeeze(1)
    hit = wy * (1 - smoothing)  # weight of the target's own -log p_y term
    loss = hit * (lse - s_y) + z_loss * wy * lse.square()
    if smoothing:
        loss = loss + smoothing / vocab * (weight_sum * lse - s_dot)
    if grad_dtype is None:
        return loss.sum(), None, None
    # d loss / d s_k = p_k (hit + 2 z w_y lse + e W / V) - hit [k = y] - (e / V) w_k, times `scale`
    dlogits = probs.mul_(((hit + 2 * z_loss * wy * lse + smoothing * weight_sum / vocab) * scale)[:, None])
    dlogits.scatter_add_(1, y[:, None], (-hit * scale)[:, None])
    if smoothing:
        dlogits.sub_((cw[None, :] if cw is not None else 1.0) * (smoothing / vocab) * scale)
    if softcap:
        dlogits.mul_(tanh.square_().neg_().add_(1))  # d(c tanh(x / c)) / dx = 1 - tanh^2
    return loss.sum(), dlogits.to(grad_dtype), (dlogits.sum(0) if bias_grad else None)


_compiled_chunk_math = None
COMPILE_FAILED: list[str] = []  # why compiling the chunk math failed in this process, if it did


def _compiled_or_eager(*args, **kwargs):
    """The compiled chunk math; where compiling fails (no Triton, a GPU it does not support) the eager
    one, with one warning: the loss is the same either way, only slower."""
    if not COMPILE_FAILED:
        try:
            return _compiled_chunk_math(*args, **kwargs)
        except Exception as e:  # torch.compile raises many types, all at the first call
            COMPILE_FAILED.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            warnings.warn(f"linear_cross_entropy: compiling the chunk math failed ({COMPILE_FAILED[0]}); "
                          "running it eagerly, which is slower on a GPU", stacklevel=2)
    return _chunk_loss_and_grad(*args, **kwargs)


def _chunk_math(device: torch.device, compiled: bool | None):
    """`_chunk_loss_and_grad`, compiled when `compiled` is True or (None) on CUDA. Compiled once per
    process: it recompiles only for new options or, once, to make the row count dynamic (the last
    chunk is shorter)."""
    global _compiled_chunk_math
    if not (compiled if compiled is not None else device.type == "cuda"):
        return _chunk_loss_and_grad
    if _compiled_chunk_math is None:
        _compiled_chunk_math = torch.compile(_chunk_loss_and_grad)
    return _compiled_or_eager


def rows_per_chunk(device: torch.device, vocab: int) -> int:
    """How many rows of [N, vocab] logits one chunk holds on `device` (CHUNK_ELEMENTS logits, at least
    MIN_CHUNK_ROWS rows)."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"]) // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """`cross_entropy(hidden @ weight.T + bias, targets, ...)` over row chunks, without ever holding the
    [N, V] logits. Each chunk's gradient with respect to its logits is formed in the forward pass,
    from the softmax already computed there, and folded straight into the gradients of hidden, weight
    and bias; backward only scales them. So backward costs no recomputation, and the memory above the
    inputs is one [rows, V] chunk plus the gradients themselves.

    Written by hand, not taken from a kernel library: torch has no fused linear+CE, and the CUDA-only
    Triton kernels elsewhere (Liger's, Cut Cross-Entropy) cover neither the CPU nor every option here
    (class weights together with smoothing and z-loss). One implementation on every device keeps
    "CUDA = CPU" testable; on CUDA it gets its speed from large chunks (CHUNK_ELEMENTS) and the
    compiled chunk math.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, class_weights, opts):
        ignore_index, smoothing, z_loss, softcap, reduction, compute_dtype, chunk_rows, need_grads, compiled = opts
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and accumulation dtype
        vocab, device = weight.shape[0], hidden.device
        # ignored rows carry no loss and a zero gradient: only the real ones are computed (one host
        # sync for the count, worth it where most rows are prompt or padding)
        rows_real = (targets != ignore_index).nonzero().squeeze(1)
        targets_real = targets.index_select(0, rows_real)
        cw = class_weights.to(device=device, dtype=acc) if class_weights is not None else None
        w_y = cw.index_select(0, targets_real) if cw is not None else torch.ones(len(rows_real), dtype=acc, device=device)
        weight_sum = cw.sum() if cw is not None else vocab
        scale = (1.0 / w_y.sum().clamp(min=1e-12) if reduction == "mean"
                 else torch.ones((), dtype=acc, device=device))

        w = weight.to(compute_dtype)
        b = bias.to(acc) if bias is not None else None
        want = ctx.needs_input_grad[:3] if need_grads else (False,) * 3
        grad_h = torch.zeros_like(hidden) if want[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if want[1] else None
        grad_b = torch.zeros(vocab, dtype=acc, device=device) if b is not None and want[2] else None
        total = torch.zeros((), dtype=acc, device=device)
        math = _chunk_math(device, compiled)
        options = dict(smoothing=smoothing, z_loss=z_loss, softcap=softcap, bias_grad=grad_b is not None,
                       grad_dtype=compute_dtype if any(want) else None)
        for start in range(0, len(rows_real), chunk_rows):
            rows, y, wy = (t[start:start + chunk_rows] for t in (rows_real, targets_real, w_y))
            h = hidden.index_select(0, rows).to(compute_dtype)
            loss, d, db = math(h @ w.t(), b, y, wy, cw, scale, weight_sum, **options)
            total += loss
            if grad_b is not None:
                grad_b += db
            if grad_h is not None:
                grad_h.index_copy_(0, rows, (d @ w).to(hidden.dtype))
            if grad_w is not None:
                if d.dtype == acc:
                    grad_w.addmm_(d.t(), h)  # in place: no [V, d] temporary per chunk
                else:
                    grad_w += d.t() @ h
        # placeholders for the gradients nobody wants, on the inputs' device: backward scales them too
        ctx.save_for_backward(*(g if g is not None else torch.empty(0, device=device) for g in (grad_h, grad_w, grad_b)))
        ctx.weight_dtype = weight.dtype
        ctx.scaled = False
        return total * scale if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if ctx.scaled:
            raise RuntimeError("linear_cross_entropy: a second backward through the same graph after one "
                               "with an upstream gradient other than 1 is not supported")
        # One look at the device per backward (microseconds; the loop syncs on the loss value anyway)
        # buys the in-place scaling: a scaled copy of the [V, d] weight gradient would double the
        # loss's memory.
        if grad_out.ne(1).item():
            ctx.scaled = True
            for g in (grad_h, grad_w, grad_b):
                g.mul_(grad_out.to(g.dtype))
        want = ctx.needs_input_grad
        return (grad_h if want[0] else None, grad_w.to(ctx.weight_dtype) if want[1] else None,
                grad_b.to(ctx.weight_dtype) if want[2] else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0,
                         class_weights: torch.Tensor | None = None, reduction: str = "mean",
                         chunked: bool = True, chunk_rows: int | None = None,
                         compiled: bool | None = None) -> torch.Tensor:
    """`cross_entropy(hidden @ weight.T + bias, targets, ...)` for hidden [..., d], weight [V, d],
    targets [...], with every option of `cross_entropy`.

    When `chunked` is on and the N rows exceed one chunk (`chunk_rows`; by default the device's
    CHUNK_ELEMENTS / V and at least MIN_CHUNK_ROWS), the [N, V] logits are never materialised: see
    `_LinearCrossEntropy`; its per-chunk math is compiled when `compiled` is True, or (None) on
    CUDA. Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as on the
    unchunked path.
    """
    vocab, width = weight.shape
    hidden, targets = hidden.reshape(-1, width), targets.reshape(-1)
    device = hidden.device.type
    rows = chunk_rows or rows_per_chunk(hidden.device, vocab)
    if not chunked or targets.numel() <= rows:
        return cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                             class_weights=class_weights, reduction=reduction)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    need_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    opts = (ignore_index, label_smoothing, z_loss, softcap, reduction, compute_dtype, rows, need_grads, compiled)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, class_weights, opts)


# -- binary and multi-label ------------------------------------------------------------------------


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, pos_weight: torch.Tensor | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """Sigmoid cross-entropy for binary or multi-label targets in [0, 1] (same shape as logits):
    -(pw * t * log sigmoid(x) + (1 - t) * log(1 - sigmoid(x))), pw = `pos_weight` per label (> 1
    favours recall). "mean" averages over every element."""
    per = F.binary_cross_entropy_with_logits(_fp32(logits), _fp32(targets), pos_weight=pos_weight, reduction="none")
    return _reduce(per.sum(), per.numel(), reduction)


def binary_focal(logits: torch.Tensor, targets: torch.Tensor, *, gamma: float = 2.0, alpha: float | None = 0.25,
                 reduction: str = "mean") -> torch.Tensor:
    """Focal loss for binary / multi-label targets (Lin et al. 2017): with p_t = p if t = 1 else 1 - p,
    -a_t * (1 - p_t)^gamma * log p_t, a_t = alpha for positives and 1 - alpha for negatives (no
    a_t when alpha is None). gamma = 0 and alpha = None is binary cross-entropy."""
    logits, targets = _fp32(logits), _fp32(targets)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    per = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        per = per * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(per.sum(), per.numel(), reduction)


def focal(logits: torch.Tensor, targets: torch.Tensor, *, gamma: float = 2.0,
          class_weights: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
          reduction: str = "mean") -> torch.Tensor:
    """Multi-class focal loss: -a_y * (1 - p_y)^gamma * log p_y over a softmax, a = `class_weights`
    (1 without). Down-weights easy examples; gamma = 0 is (weighted) cross-entropy summed. "mean"
    averages over real targets."""
    vocab = logits.shape[-1]
    logits, targets = _fp32(logits.reshape(-1, vocab)), targets.reshape(-1)
    real = targets != ignore_index
    logp = F.log_softmax(logits[real], dim=-1).gather(1, targets[real][:, None]).squeeze(1)
    per = -(1 - logp.exp()).pow(gamma) * logp
    if class_weights is not None:
        per = per * class_weights[targets[real]]
    return _reduce(per.sum(), int(real.sum()), reduction)


# -- regression ------------------------------------------------------------------------------------


def mse(pred: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error, (pred - target)^2: the default for regression; punishes large errors most."""
    return _reduce((_fp32(pred) - _fp32(target)).square().sum(), pred.numel(), reduction)


def mae(pred: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Mean absolute error (L1), |pred - target|: the median's loss, robust to outlying targets."""
    return _reduce((_fp32(pred) - _fp32(target)).abs().sum(), pred.numel(), reduction)


def huber(pred: torch.Tensor, target: torch.Tensor, *, delta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Huber loss: r^2 / 2 for |r| <= delta, delta * (|r| - delta / 2) beyond (r = pred - target):
    quadratic near the target, linear (outlier-robust) far from it."""
    r = (_fp32(pred) - _fp32(target)).abs()
    per = torch.where(r <= delta, 0.5 * r.square(), delta * (r - 0.5 * delta))
    return _reduce(per.sum(), per.numel(), reduction)


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, *, delta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Smooth L1 = Huber / delta: r^2 / (2 delta) for |r| <= delta, |r| - delta / 2 beyond; its slope
    far from the target is 1 whatever delta is (Fast R-CNN's box loss)."""
    return huber(pred, target, delta=delta, reduction=reduction) / delta


# -- margins ---------------------------------------------------------------------------------------


def hinge(scores: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Binary hinge loss max(0, margin - y * s) for labels y in {-1, +1} or {0, 1} (0 read as -1)."""
    bad = (labels != 1) & (labels != 0) & (labels != -1)
    if bool(bad.any()):
        raise ValueError(f"hinge: labels must be -1/+1 or 0/1, got {labels[bad][0].item()}")
    scores = _fp32(scores)
    y = torch.where(labels > 0, 1.0, -1.0).to(scores.dtype)
    per = (margin - y * scores).clamp(min=0)
    return _reduce(per.sum(), per.numel(), reduction)


def _class_margins(scores: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """[N, C] of max(0, margin + s_j - s_y), zero at j = y."""
    scores = _fp32(scores)
    out = (margin + scores - scores.gather(1, labels[:, None])).clamp(min=0)
    return out.scatter(1, labels[:, None], 0.0)


def hinge_crammer_singer(scores: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0,
                         reduction: str = "mean") -> torch.Tensor:
    """Multi-class hinge of Crammer and Singer: max(0, margin + max_{j != y} s_j - s_y), the margin
    against the strongest wrong class only."""
    per = _class_margins(scores, labels, margin).amax(1)
    return _reduce(per.sum(), per.numel(), reduction)


def hinge_weston_watkins(scores: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0,
                         reduction: str = "mean") -> torch.Tensor:
    """Multi-class hinge of Weston and Watkins: sum_{j != y} max(0, margin + s_j - s_y): every wrong
    class within the margin pays (C times torch's `multi_margin_loss`)."""
    per = _class_margins(scores, labels, margin).sum(1)
    return _reduce(per.sum(), per.numel(), reduction)


# -- preference pairs ------------------------------------------------------------------------------


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    return _fp32(F.linear(hidden, weight, bias)).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   bias: torch.Tensor | None = None, *, chunk_rows: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[target] for each row of hidden [N, d]: [N] in fp32, the [N, V]
    logits never held at once. Chunk by chunk; with gradients each chunk runs under torch.utils.checkpoint,
    so its logits are recomputed in backward instead of kept. (linear_cross_entropy forms its gradients in
    the forward pass instead, which needs one upstream gradient for the whole sum; a preference loss
    weights every sequence's log-probability differently, so here the recomputation is the price.)"""
    rows = chunk_rows or rows_per_chunk(hidden.device, weight.shape[0])
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for h, y in zip(hidden.split(rows), targets.split(rows)):
        if grads and len(hidden) > rows:
            parts.append(checkpoint(_chunk_logprobs, h, weight, bias, y, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(h, weight, bias, y))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


# The preference losses take each answer's log-probability under the policy and the reference (summed over
# its tokens, [B] each) and its token count. "A pair is ranked right" means chosen_reward > rejected_reward
# (preference_rewards).


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(z), with label_smoothing e: (1 - e) of it plus e times the flipped pair's -log sigmoid(-z)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log_ratios(chosen, rejected, ref_chosen, ref_rejected) -> tuple[torch.Tensor, torch.Tensor]:
    return _fp32(chosen) - _fp32(ref_chosen), _fp32(rejected) - _fp32(ref_rejected)


def dpo(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
        chosen_len: torch.Tensor, rejected_len: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
        reduction: str = "mean") -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)));
    with label_smoothing e > 0 conservative DPO, which assumes each pair flipped with probability e."""
    c, r = _log_ratios(chosen, rejected, ref_chosen, ref_rejected)
    per = _smoothed_logistic(beta * (c - r), label_smoothing)
    return _reduce(per.sum(), per.numel(), reduction)


def ipo(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
        chosen_len: torch.Tensor, rejected_len: torch.Tensor, *, beta: float = 0.1,
        reduction: str = "mean") -> torch.Tensor:
    """IPO (Azar et al. 2023): (c / |c| - r / |r| - 1 / (2 beta))^2 of the answers' log-ratios to the reference,
    each divided by its token count (as TRL computes it, the form its authors confirmed the paper used)."""
    c, r = _log_ratios(chosen, rejected, ref_chosen, ref_rejected)
    per = (c / chosen_len.clamp(min=1) - r / rejected_len.clamp(min=1) - 1 / (2 * beta)) ** 2
    return _reduce(per.sum(), per.numel(), reduction)


def simpo(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
          ref_rejected: torch.Tensor | None, chosen_len: torch.Tensor, rejected_len: torch.Tensor, *,
          beta: float = 2.0, margin: float = 1.0, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (chosen / |c| - rejected / |r|) - margin), the
    answers' mean token log-probabilities and a target reward margin (gamma); smoothed as dpo is."""
    c, r = _fp32(chosen) / chosen_len.clamp(min=1), _fp32(rejected) / rejected_len.clamp(min=1)
    per = _smoothed_logistic(beta * (c - r) - margin, label_smoothing)
    return _reduce(per.sum(), per.numel(), reduction)


REFERENCE_FREE = ("simpo",)  # the preference losses that need no reference model


@torch.no_grad()
def preference_rewards(name: str, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len,
                       beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards of the answers [B] each: beta times the log-ratio to the reference (dpo, ipo), or
    beta times the mean token log-probability (simpo)."""
    if name in REFERENCE_FREE:
        return beta * _fp32(chosen) / chosen_len.clamp(min=1), beta * _fp32(rejected) / rejected_len.clamp(min=1)
    c, r = _log_ratios(chosen, rejected, ref_chosen, ref_rejected)
    return beta * c, beta * r


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """-log sigmoid(chosen - rejected) for scores [B] of the preferred and the other answer (a reward model's
    loss: the Bradley-Terry probability that the chosen answer wins)."""
    per = -F.logsigmoid(_fp32(chosen) - _fp32(rejected))
    return _reduce(per.sum(), per.numel(), reduction)


# The config's loss.name -> function; config.LOSS_OPTIONS says which loss.* options each one takes.
LOSSES = {
    "cross_entropy": cross_entropy,
    "focal": focal,
    "bce": binary_cross_entropy,
    "binary_focal": binary_focal,
    "mse": mse,
    "mae": mae,
    "huber": huber,
    "smooth_l1": smooth_l1,
    "hinge": hinge,
    "hinge_crammer_singer": hinge_crammer_singer,
    "hinge_weston_watkins": hinge_weston_watkins,
    "dpo": dpo,
    "ipo": ipo,
    "simpo": simpo,
    "bradley_terry": bradley_terry,
}


def loss_options(lc, device: torch.device | str = "cpu") -> dict:
    """The keyword options of `lc.name`'s function from a LossConfig, lists turned into tensors."""
    from lmforge.config import LOSS_OPTIONS

    out = {}
    for key in LOSS_OPTIONS[lc.name]:
        value = getattr(lc, key)
        out[key] = torch.tensor(value, dtype=torch.float32, device=device) if isinstance(value, list) else value
    return out
