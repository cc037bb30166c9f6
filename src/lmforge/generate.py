"""Text generation: greedy and sampled decoding (temperature, top-k, top-p) with a KV cache."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from lmforge.data.tokenizer import eos_id
from lmforge.errors import UserError


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the mass is already reached
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids: set[int] | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
    """Continue `prompt` [B, T] by up to `max_new_tokens`; returns only the new tokens [B, <=max_new_tokens].

    A row stops after it emits a token from `stop_ids` (later positions of that row repeat it);
    generation ends when every row has stopped. `on_token(tokens [B])` is called after each step
    and may return True to stop early (stop strings). The model's context bounds the total length.
    """
    if not 0 < top_p <= 1:
        raise UserError(f"generate: top_p = {top_p}: expected a probability mass in (0, 1]; 1 = off")
    if top_k < 0:
        raise UserError(f"generate: top_k = {top_k}: expected 0 (off) or a positive number of tokens")
    was_training = model.training
    model.eval()
    B, T = prompt.shape
    limit = model.cfg.max_seq_len
    if T >= limit:
        raise UserError(f"generate: the prompt has {T} tokens; the model's context is {limit}, leaving no room")
    max_new_tokens = min(max_new_tokens, limit - T)
    caches = model.new_caches(B, T + max_new_tokens) if use_cache else None
    seq, out = prompt, []
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    stops = torch.tensor(sorted(stop_ids), device=prompt.device) if stop_ids else None
    logits = model(prompt, caches)[:, -1]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if out:
            nxt = torch.where(done, out[-1], nxt)
        out.append(nxt)
        if stops is not None:
            done |= torch.isin(nxt, stops)
        if bool(done.all()) or (on_token is not None and on_token(nxt)) or len(out) == max_new_tokens:
            break
        if use_cache:
            logits = model(nxt[:, None], caches)[:, -1]
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = model(seq)[:, -1]
    model.train(was_training)
    return torch.stack(out, dim=1) if out else prompt.new_zeros(B, 0)


def generate_text(model, tok: Tokenizer, prompt: str | list[int], max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, stop: list[str] | None = None,
                  stop_at_eos: bool = True, generator: torch.Generator | None = None, use_cache: bool = True) -> str:
    """Generate a continuation of one prompt and return it as text, cut before the first stop string.
    End-of-text tokens inside the output show as line breaks when generation runs past them."""
    ids = tok.encode(prompt, add_special_tokens=False).ids if isinstance(prompt, str) else list(prompt)
    if not ids:
        eos = eos_id(tok)
        if eos is None:
            raise UserError("generate: the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [eos]
    device = next(model.parameters()).device
    eos = eos_id(tok)
    new: list[int] = []

    def text_of(tokens: list[int]) -> str:
        pieces, cur = [], []
        for t in tokens + [None]:
            if t is None or t == eos:
                pieces.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        return "\n".join(pieces)

    def hit_stop(nxt: torch.Tensor) -> bool:
        new.append(int(nxt[0]))
        return bool(stop) and any(s in text_of(new) for s in stop)

    generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, top_p,
             stop_ids={eos} if stop_at_eos and eos is not None else None, use_cache=use_cache,
             generator=generator, on_token=hit_stop)
    if stop_at_eos and eos in new:
        new = new[:new.index(eos)]
    text = text_of(new)
    for s in stop or []:
        text = text.split(s)[0]
    return text
