"""Batched greedy continuation for many big-model sessions at once (what the Serve BigModel batches).

Each session is a `BigLM` whose KV cache holds its own text between calls. A batched call first brings
every session up to date on its text (only the new suffix is encoded, exactly as `continue_text`
does), then decodes all sessions together: their caches are left-padded to one length and stacked
[B, heads, L, d], each step feeds one token per session with an attention mask over the padding and
explicit positions (so rotary/learned position embeddings see each session's true positions), and at
the end every session takes back exactly its own slice of the cache. Results equal `continue_text`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from lacy.cascade import BigLM, _ends_unit


def _decide(lm: BigLM, out: str, generated: list[int], unit: str, max_tokens: int) -> tuple[int | None, str]:
    """The session's next token and its text so far, or None when its continuation is complete."""
    if len(generated) >= max_tokens or lm.room() <= 0:
        return None, out
    token = int(torch.argmax(lm.logits))
    if token == lm.tokenizer.eos_token_id:
        return None, out
    extended = lm.decode(generated + [token])
    if unit != "tokens" and _ends_unit(out, extended[len(out):], unit):
        return None, out
    return token, extended


@torch.inference_mode()
def continue_batch(lms: Sequence[BigLM], texts: Sequence[str], *, units: Sequence[str],
                   max_tokens: Sequence[int], contexts: Sequence[str] | None = None) -> list[str]:
    """`[lm.continue_text(text, unit=u, max_tokens=m, context=c) ...]`, decoded as one batch.

    All sessions must share one model (they are sessions of one deployment replica)."""
    n = len(lms)
    if not n:
        return []
    if len({id(lm.model) for lm in lms}) != 1:
        raise ValueError("continue_batch: all sessions must share one model")
    if len({id(lm) for lm in lms}) != n:
        raise ValueError("continue_batch: a session appears twice in one batch")
    for unit, m in zip(units, max_tokens, strict=True):
        if unit not in ("word", "entity", "tokens") or m <= 0:
            raise ValueError(f"bad unit/max_tokens: {unit!r}, {m}")
    contexts = contexts or [""] * n
    for lm, text, context in zip(lms, texts, contexts, strict=True):
        lm.sync(lm.encode(context + text))

    outs, generated, tokens = [""] * n, [[] for _ in range(n)], [None] * n
    for i, lm in enumerate(lms):
        tokens[i], outs[i] = _decide(lm, outs[i], generated[i], units[i], max_tokens[i])
    if all(t is None for t in tokens):
        return outs

    model = lms[0].model
    device = model.device
    lengths = [len(lm.ids) for lm in lms]
    width = max(lengths)
    layers = len(lms[0].cache.layers)
    stacked = []
    for layer in range(layers):
        keys, values = [], []
        for lm, length in zip(lms, lengths, strict=True):
            k, v = lm.cache.layers[layer].keys, lm.cache.layers[layer].values
            pad = (0, 0, width - length, 0)  # left-pad the sequence dimension of [1, H, L, d]
            keys.append(torch.nn.functional.pad(k, pad))
            values.append(torch.nn.functional.pad(v, pad))
        stacked.append((torch.cat(keys), torch.cat(values)))
    cache = DynamicCache(ddp_cache_data=stacked)
    mask = torch.zeros(n, width, dtype=torch.long, device=device)
    for i, length in enumerate(lengths):
        mask[i, width - length:] = 1
    positions = torch.tensor(lengths, device=device)
    fed = [0] * n
    pad_id = lms[0].start_id

    while any(t is not None for t in tokens):
        live = torch.tensor([t is not None for t in tokens], device=device)
        step = torch.tensor([[pad_id if t is None else t] for t in tokens], device=device)
        mask = torch.cat([mask, live.long()[:, None]], dim=1)
        out = model(input_ids=step, attention_mask=mask, position_ids=positions[:, None],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        for i, lm in enumerate(lms):
            if tokens[i] is None:
                continue
            generated[i].append(tokens[i])
            lm.tokens_generated += 1
            lm.tokens_processed += 1
            lm.logits = out.logits[i, -1].float()
            fed[i] += 1
            positions[i] += 1
            tokens[i], outs[i] = _decide(lm, outs[i], generated[i], units[i], max_tokens[i])

    # Once a session stops it stays stopped, so its valid cache is its padded-away prefix plus the
    # first fed[i] appended columns; later columns are masked filler.
    for i, lm in enumerate(lms):
        lo, hi = width - lengths[i], width + fed[i]
        lm.cache = DynamicCache(ddp_cache_data=[
            (layer.keys[i:i + 1, :, lo:hi].contiguous(), layer.values[i:i + 1, :, lo:hi].contiguous())
            for layer in cache.layers])
        lm.ids = lm.ids + generated[i]
    return outs
