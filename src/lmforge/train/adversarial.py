"""Adversarial training on the embedding output: FGM (Miyato et al. 2017, one step of size epsilon along
the loss gradient) and PGD (Madry et al. 2018, several steps of size alpha projected back into the
epsilon ball). The perturbation is added to the token-embedding output of each example through a
forward hook, so no weight is modified; the adversarial loss's gradient is added to the clean one.

Written here rather than taken from a library: the ones that exist perturb the embedding *matrix* in
place and restore it, which is unsafe with shared (tied) weights and under DDP.
"""

from __future__ import annotations

from typing import Callable

import torch

TINY = 1e-12


def _unit(g: torch.Tensor) -> torch.Tensor:
    """g scaled to L2 norm 1 per example (over its positions and features)."""
    norm = g.flatten(1).norm(dim=1).clamp(min=TINY)
    return g / norm.view(-1, *[1] * (g.dim() - 1))


def _project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """delta pulled back into the L2 ball of radius epsilon, per example."""
    norm = delta.flatten(1).norm(dim=1).clamp(min=TINY)
    return delta * (epsilon / norm).clamp(max=1.0).view(-1, *[1] * (delta.dim() - 1))


class Adversary:
    def __init__(self, model: torch.nn.Module, rc):
        self.method, self.epsilon, self.steps, self.alpha = rc.adversarial, rc.epsilon, rc.pgd_steps, rc.pgd_alpha
        self.delta: torch.Tensor | None = None  # added to the embedding output while set
        self.clean: torch.Tensor | None = None  # the embedding output of the last clean forward pass
        self._handle = model.tok_emb.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.delta is not None:
            return output + self.delta.to(output.dtype)
        if torch.is_grad_enabled():
            if not output.requires_grad:  # frozen embeddings (PEFT): a leaf that still gets a gradient
                output = output.detach().requires_grad_(True)
            output.retain_grad()
            self.clean = output
            return output
        return None

    def remove(self) -> None:
        self._handle.remove()

    def attack(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """After the clean loss's backward pass: add the gradient of the loss at the perturbed embedding
        output (loss_fn() runs a forward pass and returns the scaled loss). Returns the adversarial loss."""
        grad = self.clean.grad
        self.clean = None
        if grad is None:
            raise RuntimeError("Adversary.attack needs the clean loss's backward pass first")
        grad = grad.detach().float()
        try:
            if self.method == "fgm":
                self.delta = self.epsilon * _unit(grad)
            else:
                delta = torch.zeros_like(grad)
                for _ in range(self.steps - 1):
                    delta = _project(delta + self.alpha * _unit(grad), self.epsilon).requires_grad_(True)
                    self.delta = delta
                    grad = torch.autograd.grad(loss_fn(), delta)[0].float()  # no weight gradients on the way
                    delta = delta.detach()
                self.delta = _project(delta + self.alpha * _unit(grad), self.epsilon)
            loss = loss_fn()
            loss.backward()
            return loss.detach()
        finally:
            self.delta = None
