"""Text generation: greedy and sampled decoding (temperature, top-k, top-p) with a KV cache; greedy and beam
search decoding for encoder-decoder models, and `translate` on text."""

from __future__ import annotations

import math
import warnings

import torch
from tokenizers import Tokenizer

from lmforge.data.tokenizer import eos_id, seq2seq_special_ids
from lmforge.errors import UserError
from lmforge.fields import SEED_MAX


def check_seed(seed: int, samples: int, where: str) -> None:
    """Sample i of `lmforge generate` draws from seed + i: every one of them must be a seed torch takes."""
    top = SEED_MAX - max(samples - 1, 0)
    if not 0 <= seed <= top:
        raise UserError(f"{where} = {seed}: expected 0 to {top}" + (f" (sample i of {samples} uses the seed + i)"
                                                                    if samples > 1 else ""))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. temperature 0 means greedy (argmax). generator: one for the
    batch, or one per row (rows of different requests batched together each draw from their own seed)."""
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
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids: set[int] | None = None, use_cache: bool = True,
             generator: torch.Generator | list[torch.Generator] | None = None, on_token=None,
             left_pad: torch.Tensor | None = None) -> torch.Tensor:
    """Continue `prompt` [B, T] by up to `max_new_tokens`; returns only the new tokens [B, <=max_new_tokens].
    left_pad [B]: prompts of different lengths, left-padded to T (see Transformer.features).

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
    padded = {} if left_pad is None else {"left_pad": left_pad}
    logits = model(prompt, caches, **padded)[:, -1]
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
            logits = model(nxt[:, None], caches, **padded)[:, -1]
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = model(seq, **padded)[:, -1]
    model.train(was_training)
    return torch.stack(out, dim=1) if out else prompt.new_zeros(B, 0)


def prompt_ids(tok: Tokenizer, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids; an empty prompt starts from the end-of-text token (the start of a document)."""
    ids = tok.encode(prompt, add_special_tokens=False).ids if isinstance(prompt, str) else list(prompt)
    if not ids:
        eos = eos_id(tok)
        if eos is None:
            raise UserError("generate: the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [eos]
    return ids


def generate_text(model, tok: Tokenizer, prompt: str | list[int], max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, stop: list[str] | None = None,
                  stop_at_eos: bool = True, generator: torch.Generator | None = None, use_cache: bool = True,
                  on_text=None, end_ids: set[int] | None = None) -> str:
    """Generate a continuation of one prompt and return it as text, cut before the first stop string.
    End-of-text tokens inside the output show as line breaks when generation runs past them.
    on_text(text so far) is called after each new token (streaming). end_ids: the model's own end tokens
    (an imported chat model's eos ids, runs.end_token_ids), where generation stops besides lmforge's."""
    stream = (lambda texts: on_text(texts[0])) if on_text is not None else None
    return generate_texts(model, tok, [prompt_ids(tok, prompt)], max_new_tokens, temperature, top_k, top_p, stop,
                          stop_at_eos, generator, use_cache, stream, end_ids)[0]


def stop_token_ids(tok: Tokenizer, stop: list[str] | None) -> set[int]:
    """The stop strings that are special tokens (`--stop "<|im_end|>"`), as ids: the decoded text never
    shows a special token, so such a stop string could never match it."""
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    return {tok.token_to_id(s) for s in stop or [] if s in special}


def generate_texts(model, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int = 200,
                   temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, stop: list[str] | None = None,
                   stop_at_eos: bool = True, generator: torch.Generator | list[torch.Generator] | None = None,
                   use_cache: bool = True, on_text=None, end_ids: set[int] | None = None) -> list[str]:
    """generate_text for several prompts at once, left-padded to the longest (one forward pass a step; the
    server batches concurrent requests this way). on_text(texts so far) is called after each step and may
    return True to stop."""
    device = next(model.parameters()).device
    eos = eos_id(tok)
    # where a row ends: the end-of-text token and the model's own end tokens (unless told to run past
    # them), and any stop string that is a special token
    ends = ({eos} | set(end_ids or ()) if stop_at_eos else set()) | stop_token_ids(tok, stop)
    ends.discard(None)
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    batch = torch.tensor([[p[0]] * n + p for p, n in zip(prompts, pads)], device=device)
    left_pad = torch.tensor(pads, device=device) if any(pads) else None
    new: list[list[int]] = [[] for _ in prompts]

    def decoded(tokens: list[int]) -> str:
        pieces, cur = [], []
        for t in tokens + [None]:
            if t is None or t == eos:
                pieces.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        return "\n".join(pieces)

    def finished(tokens: list[int]) -> str:
        tokens = tokens[:next((i for i, t in enumerate(tokens) if t in ends), len(tokens))]
        text = decoded(tokens)
        for s in stop or []:
            text = text.split(s)[0]
        return text

    def step(nxt: torch.Tensor) -> bool:
        for row, t in zip(new, nxt.tolist()):
            row.append(t)
        if on_text is not None and on_text([finished(row) for row in new]):
            return True  # the caller gave up (a streaming client went away)
        return bool(stop) and all(any(s in decoded(row) for s in stop) for row in new)

    generate(model, batch, max_new_tokens, temperature, top_k, top_p,
             stop_ids=ends or None, use_cache=use_cache,
             generator=generator, on_token=step, left_pad=left_pad)
    return [finished(row) for row in new]


# -- encoder-decoder decoding: greedy, beam search, translate --------------------------------------
# max_lengths count the new tokens of a row, end token included. The decoder is fed the start token and
# all but the last new token, so a row needs at most max_seq_len positions: limits are clamped to that.


def _limits(model, max_lengths: torch.Tensor) -> list[int]:
    # at least one step, so that every row ends with a hypothesis (possibly only the end token)
    return max_lengths.clamp(1, model.cfg.max_seq_len).tolist()


@torch.no_grad()
def greedy_decode(model, source: torch.Tensor, source_mask: torch.Tensor | None, bos: int, eos: int,
                  max_lengths: torch.Tensor, use_cache: bool = True) -> list[list[int]]:
    """The most likely next token at every step, for an EncoderDecoder. source [B, S], source_mask [B, S]
    (True at real tokens) or None, max_lengths [B]. Returns each row's new ids, without bos and eos.
    Without the cache every step re-feeds the whole prefix (a reference for the cached path)."""
    limits = _limits(model, max_lengths)
    B, steps = len(limits), max(limits)
    memory = model.encode(source, source_mask)
    caches = model.new_caches(B, steps) if use_cache else None
    seq = source.new_full((B, 1), bos)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(steps):
        nxt = model.decode(seq[:, -1:] if use_cache else seq, memory, caches)[:, -1].argmax(dim=-1)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue  # finished rows still run along in the batch; their tokens are ignored
            if t == eos:
                done[i] = True
            else:
                out[i].append(t)
                done[i] = len(out[i]) >= limits[i]
        if all(done):
            break
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return out


@torch.no_grad()
def beam_search(model, source: torch.Tensor, source_mask: torch.Tensor | None, bos: int, eos: int,
                max_lengths: torch.Tensor, beam_size: int = 5, length_penalty: float = 1.0,
                use_cache: bool = True) -> list[list[int]]:
    """Beam search over B sources at once (B * beam_size decoder rows), as fairseq does it.

    Live hypotheses are ranked by their summed log-probability; a hypothesis that ends (eos) or reaches
    its row's max length is scored sum / length ** length_penalty (length: new tokens, eos included).
    A source is done once it has beam_size ended hypotheses or reaches its max length; done sources
    leave the batch. Returns the best-scoring hypothesis of each source, without bos and eos."""
    if beam_size < 1:
        raise UserError(f"beam_search: beam_size = {beam_size}: expected 1 or more")
    limits = _limits(model, max_lengths)
    B, K, steps = len(limits), beam_size, max(limits)
    dev = source.device
    base = model.encode(source, source_mask)  # once; live rows select from it
    live = torch.arange(B, device=dev)  # the sources still searching, as indices into the batch
    memory = model.select(base, live.repeat_interleave(K))
    caches = model.new_caches(B * K, steps) if use_cache else None
    tokens = source.new_full((B * K, 1), bos)  # every live hypothesis, bos first, row = source * K + beam
    # only the first beam is live at the start: the others are -inf, so the K copies of bos give no duplicates
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for step in range(steps):
        n, length = len(live), step + 1
        logits = model.decode(tokens[:, -1:] if use_cache else tokens, memory, caches)[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(n, K, V)).view(n, K * V)
        # 2K candidates: at most K of them end (one eos per beam), so K that go on always remain
        top, flat = cand.topk(2 * K, dim=-1)
        parent, tok = flat // V, flat % V
        ended = tok == eos
        # the K best candidates that do not end go on, in score order (the ended ones sort last)
        order = torch.arange(2 * K, device=dev) + ended.long() * 2 * K
        keep_rank = order.topk(K, dim=-1, largest=False).indices
        scores = top.gather(1, keep_rank)
        parent, tok_next = parent.gather(1, keep_rank), tok.gather(1, keep_rank)
        rows = (torch.arange(n, device=dev)[:, None] * K + parent).flatten()  # the row each new beam extends
        prev, tokens = tokens, torch.cat([tokens[rows], tok_next.flatten()[:, None]], dim=1)

        done = []
        ended_l, top_l, flat_l, scores_l = ended.tolist(), top.tolist(), flat.tolist(), scores.tolist()
        for j, src in enumerate(live.tolist()):
            fin = finished[src]
            # only ends among the K best count (fairseq): a lower-ranked end is not one the beam would
            # take, and with beam_size 1 this makes beam search exactly greedy decoding
            for r in range(K):
                if ended_l[j][r] and len(fin) < K:
                    fin.append((top_l[j][r] / length ** length_penalty, prev[j * K + flat_l[j][r] // V, 1:].tolist()))
            out_of_room = length >= limits[src]
            if out_of_room:  # the live beams end here, scored the same way
                fin.extend((scores_l[j][b] / length ** length_penalty, tokens[j * K + b, 1:].tolist())
                           for b in range(K))
            done.append(out_of_room or len(fin) >= K)
        if all(done):
            break
        if any(done):  # drop finished sources: their rows leave the tokens, scores, caches and memory
            stay = torch.tensor([not d for d in done], device=dev)
            live, scores = live[stay], scores[stay]
            stay_rows = stay.repeat_interleave(K)
            tokens, rows = tokens[stay_rows], rows[stay_rows]
            memory = model.select(base, live.repeat_interleave(K))  # only when the live set changes
        if use_cache:
            for c in caches:
                c.reorder(rows)  # one gather per step: beam reordering and dropped sources together
    return [max(fin, key=lambda f: f[0])[1] for fin in finished]


def translate(model, tokenizer: Tokenizer, texts: list[str], beam_size: int = 5, length_penalty: float = 1.0,
              max_length_ratio: float = 1.5, batch_size: int = 64, use_cache: bool = True,
              source_tokenizer: Tokenizer | None = None) -> list[str]:
    """Translate each text with an EncoderDecoder: greedy when beam_size is 1, else beam search. Sources
    are sorted by length into batches so that little padding is computed; outputs keep the input order.
    A text with no tokens (an empty line) gives "" without running the model. source_tokenizer: the
    source side's own tokenizer (separate vocabularies); by default `tokenizer` encodes the source too."""
    pad, bos, eos = seq2seq_special_ids(tokenizer)
    limit = model.cfg.max_seq_len
    sources: dict[int, list[int]] = {}
    too_long = []
    for i, text in enumerate(texts):
        ids = (source_tokenizer or tokenizer).encode(text, add_special_tokens=False).ids
        if len(ids) > limit - 1:
            too_long.append(i + 1)
        if ids:
            sources[i] = ids[:limit - 1] + [eos]  # the source ends with </s>, as in training
    if too_long:
        warnings.warn(f"translate: {len(too_long)} input line(s) (first: line {too_long[0]}) have more than the model's "
                      f"{limit - 1} source tokens; only their beginning is translated", stacklevel=2)
    # longest first: the slowest batch runs first, and lengths in a batch are close
    order = sorted(sources, key=lambda i: -len(sources[i]))
    outputs = [""] * len(texts)
    device = next(model.parameters()).device
    decode = greedy_decode if beam_size == 1 else beam_search
    extra = {} if beam_size == 1 else dict(beam_size=beam_size, length_penalty=length_penalty)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [sources[i] for i in order[start:start + batch_size]]
                lengths = torch.tensor([len(s) for s in batch], device=device)
                source = torch.full((len(batch), int(lengths.max())), pad, dtype=torch.long, device=device)
                for row, s in enumerate(batch):
                    source[row, :len(s)] = torch.tensor(s, device=device)
                mask = torch.arange(source.shape[1], device=device)[None] < lengths[:, None]
                max_new = [min(math.ceil(max_length_ratio * len(s)) + 10, limit - 1) for s in batch]
                hyps = decode(model, source, mask, bos, eos, torch.tensor(max_new, device="cpu"), use_cache=use_cache, **extra)
                for i, ids in zip(order[start:start + batch_size], hyps):
                    outputs[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs
