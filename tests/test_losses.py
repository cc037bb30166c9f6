"""The chunked output-projection loss against the plain one (torch.nn.functional as the oracle)."""

import pytest
import torch
import torch.nn.functional as F

from lmforge import losses
from lmforge.losses import IGNORE_INDEX, linear_cross_entropy_sum


@pytest.mark.parametrize("grad", [True, False])
def test_chunked_linear_cross_entropy_matches_plain(monkeypatch, grad):
    # Small chunk sizes force several chunks (and a ragged last one) on small tensors.
    monkeypatch.setattr(losses, "CHUNK_ABOVE", 100)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 7 * 11)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=grad)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=grad)
    targets = torch.randint(11, (30,), generator=g)
    targets[[0, 5, 6, 29]] = IGNORE_INDEX
    targets[7:14] = IGNORE_INDEX  # one whole chunk of ignored rows
    got = linear_cross_entropy_sum(hidden, weight, targets)
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if grad:
        got_grads = torch.autograd.grad(got, (hidden, weight))
        want_grads = torch.autograd.grad(want, (hidden, weight))
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_unchunked_when_small_or_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(losses, "checkpoint", lambda *a, **k: calls.append(1))
    h, w, t = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3), torch.randint(5, (4,))
    linear_cross_entropy_sum(h, w, t)  # 20 logits: far below the threshold
    monkeypatch.setattr(losses, "CHUNK_ABOVE", 1)
    linear_cross_entropy_sum(h, w, t, chunked=False)
    assert calls == []
