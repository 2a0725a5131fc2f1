"""KV-cached causal LMs over a growing text: the small model's state in a cascade (`SmallLM`).

Both models of a cascade keep a KV cache and, when the text changes under them, re-encode only the
suffix after the longest common token prefix (so a generation with many calls costs each model a
number of forward tokens linear in the text length, not quadratic).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import torch

from lacy.core.config import TRIGGERS
from lacy.corpus.tokenizer import CALL_TOKEN


def last_logits_only(model: Any) -> dict[str, int]:
    """Forward arguments that compute the logits of the last position only, where the model takes them: only
    the next-token distribution is ever read, and a pass over n tokens would otherwise put all n through the
    output head (a fifth of SmolLM2-135M's weights: prefill passes 1.1-1.2x faster on a CPU without it)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class CachedLM:
    """A causal LM plus the token ids whose keys/values sit in its cache.

    `sync(ids)` makes the cache hold exactly `ids`: it keeps the longest common prefix with what is
    cached, crops the rest (`DynamicCache.crop` takes a negative count in transformers 5) and feeds
    only the new suffix. `logits` is then the next-token distribution after `ids`, shape [V].
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        self.max_positions: int | None = (getattr(config, "n_positions", None)
                                          or getattr(config, "max_position_embeddings", None))
        # Every text is encoded after a start token, so an empty text still has a next-token
        # distribution; our tokenizer's bos is <|endoftext|>, the document separator of training.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("tokenizer has neither a bos nor an eos token to start texts with")
        self.start_id = int(start)
        self.pass_options = last_logits_only(model)
        """What every forward pass adds to its arguments (`last_logits_only`)."""
        self.tokens_processed = 0
        """Tokens fed through the model since construction (never reset: callers take differences)."""
        self.seconds = 0.0
        """Time spent in forward passes since construction."""
        self.feeder: Any = None
        """Something with `feed(lm, ids)` that runs this LM's forward passes, e.g. batched with other
        sessions' (`lacy.cascade.batching.FeedBatcher`); None: each pass runs alone."""
        self.reset()

    def reset(self) -> None:
        """Forget the cache (the counters keep counting)."""
        self.ids: list[int] = []
        self.cache: Any = None
        self.logits: torch.Tensor | None = None

    def encode(self, text: str) -> list[int]:
        """Start token + the text's ids; special-token strings in the text stay text."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [self.start_id, *ids]

    def room(self) -> int:
        """How many more tokens fit in the model's context (a large number if unbounded)."""
        return (self.max_positions or 1 << 30) - len(self.ids)

    def sync(self, ids: list[int]) -> None:
        """Cache exactly `ids` (start token included), feeding only what differs from the cache."""
        if new := self.prepare(ids):
            self.feed(new)

    def prepare(self, ids: list[int]) -> list[int]:
        """The first half of `sync`: crop the cache to its longest common prefix with `ids` and return
        the ids still to feed ([] when the cache holds `ids` already); `lacy.cascade.batching.sync_many` feeds
        many sessions' at once."""
        if self.max_positions is not None and len(ids) > self.max_positions:
            raise ValueError(f"text is {len(ids)} tokens, more than the model's context of "
                             f"{self.max_positions}")
        common = common_prefix(self.ids, ids)
        if common == len(ids) == len(self.ids) and self.logits is not None:
            return []
        # Re-feed at least the last token: its logits are the next-token distribution we need.
        keep = min(common, len(ids) - 1)
        if keep == 0:
            self.cache = None
        elif keep < len(self.ids):
            self.cache.crop(keep - len(self.ids))
        self.ids = self.ids[:keep]
        return ids[keep:]

    def append(self, token_id: int) -> None:
        self.feed([token_id])

    def feed(self, new_ids: list[int]) -> None:
        """Read `new_ids` after the cached ones: through `feeder` (batched with other sessions') if set."""
        if self.feeder is not None:
            self.feeder.feed(self, new_ids)
        else:
            self.forward(new_ids)

    @torch.inference_mode()
    def forward(self, new_ids: list[int]) -> None:
        """Feed `new_ids` after the cached ones, alone (what `feed` does without a feeder)."""
        start = time.perf_counter()
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self.model.device)
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, **self.pass_options)
        self.cache = out.past_key_values
        self.logits = out.logits[0, -1].float()
        self.ids.extend(new_ids)
        self.tokens_processed += len(new_ids)
        self.seconds += time.perf_counter() - start

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class SmallLM(CachedLM):
    """Our small model: greedy stepping with a KV cache and P(<CALL>) at each step."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        call = tokenizer.convert_tokens_to_ids(CALL_TOKEN)
        if call is None or call == tokenizer.unk_token_id:
            raise ValueError(f"the small model's tokenizer has no {CALL_TOKEN} token")
        self.call_id = int(call)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is not None:  # texts start as a document did in training: after the separator
            self.start_id = int(self.eos_id)
        # A sentencepiece-style decoder drops the space a text's first token starts with ("▁word" -> "word"),
        # which would glue the cascade's pieces together: pieces are decoded after an anchor token instead.
        self._anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
        self._anchor_text = super().decode(self._anchor)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` as a piece of a longer text (a leading space kept whatever the tokenizer)."""
        text = super().decode([*self._anchor, *ids])
        return text[len(self._anchor_text):] if text.startswith(self._anchor_text) else super().decode(ids)

    def sync_text(self, text: str) -> None:
        """Make the model's state the full `text` (re-encoding only what changed)."""
        self.sync(self.encode(text))

    def call_score(self, trigger: str = "p_call") -> float:
        """The score a call trigger compares with its threshold, as log-odds log(p / (1 - p)) computed from
        the logits, so it never rounds to a tie where p rounds to 1:
          - "p_call": p = P(<CALL>) (z_CALL - logsumexp of the other logits);
          - "confidence": p = 1 - the largest probability of the real-token distribution, the softmax with
            <CALL> removed (logsumexp of the other real logits - the largest);
          - "combined": p = P(<CALL>) + (1 - P(<CALL>)) (1 - p_max), the chance that the model delegates or
            writes a token it is unsure of: its trained head and its uncertainty, one score.
        ("random" is scored by the decoding, which holds the random stream: `lacy.cascade.engine`.)"""
        if trigger not in TRIGGERS or trigger == "random":
            raise ValueError(f"SmallLM scores {[t for t in TRIGGERS if t != 'random']}, not {trigger!r}")
        if trigger == "combined":
            # log(1 - p) = log(1 - P(<CALL>)) + log(p_max), each from its log-odds: log(1 - sigmoid(x)) = -softplus(x)
            softplus = torch.nn.functional.softplus
            log_rest = float(-softplus(torch.tensor(self.call_score("p_call"), dtype=torch.float64))
                             - softplus(torch.tensor(self.call_score("confidence"), dtype=torch.float64)))
            return math.log(-math.expm1(log_rest)) - log_rest if log_rest < 0 else -math.inf
        logits = self.next_logits(allow_call=trigger == "p_call").double()
        top = self.call_id if trigger == "p_call" else int(logits.argmax())
        rest = logits.clone()
        rest[top] = float("-inf")
        top_log_odds = float(logits[top] - torch.logsumexp(rest, dim=-1))  # log-odds of `top`'s probability
        return top_log_odds if trigger == "p_call" else -top_log_odds  # confidence: of 1 - p_max

    def next_logits(self, allow_call: bool = True) -> torch.Tensor:
        """Next-token logits [V]; with allow_call=False the <CALL> logit is -inf (small-alone, leakage)."""
        assert self.logits is not None, "sync a text first"
        if allow_call:
            return self.logits
        logits = self.logits.clone()
        logits[self.call_id] = float("-inf")
        return logits

