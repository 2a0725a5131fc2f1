"""Reference-model losses (Rho) and judge labels (judge rule), mapped onto OUR tokens by character offsets.

A reference or judge model has its own tokenisation, so everything goes through character offsets of
the same text. Both run the model on the text in its own tokens, in sliding windows of `max_length`
tokens that advance by `stride` (every output keeps at least `max_length - stride` tokens of context;
long texts are never truncated), batched across texts.

Reference losses (`ReferenceScorer.token_losses`): each reference token's NLL is spread evenly over
its characters, and our token's loss is the sum over its characters. Where the reference tokens nest
inside ours (" Paris" = " Par" + "is"), that is exactly the reference's joint NLL of our token; where a
reference token crosses our boundaries (our " Eif" + "fel" under one reference " Eiffel"), each of our
pieces gets a share by length, so the total is conserved and no piece of a split rare word (often a
fact) is left without a value. NaN where our token covers a character whose reference token has no
loss (the text's first reference token has no context) or covers no reference character at all
(e.g. an empty token). Byte-level pieces of one multi-byte character share its offsets, and each gets
the whole character's loss.

Judge labels (`JudgeLabeler.accept_sets`) are an approximation that makes the judge rule computable
offline by the scoring job, without running the judge on the small model's predictions during
training: at each of our tokens, take the judge's next-token distribution at the character where
our token starts (rows of -1 where no judge token ends exactly there); score every token of OUR
vocabulary by the judge's log-prob of the judge's first token of that token's string (a table built
once); accept the `top_k` best our-vocab ids whose score is >= the real token's score - `margin`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# (text index, first output position kept, log-probs [m, V] of outputs first..first+m-1)
Handler = Callable[[int, int, torch.Tensor], None]


class _CharAlignedLM:
    """A causal LM run over texts in its own tokenisation, in sliding windows, batched."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str = "cpu",
                 max_length: int | None = None, stride: int | None = None, batch_size: int = 8) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        context = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
        self.max_length = max_length or min(int(context), 1024)
        self.stride = stride or max(1, self.max_length // 2)
        self.batch_size = batch_size
        if self.max_length > context:
            raise ValueError(f"max_length {self.max_length} exceeds the model's context of {context}")
        if not 0 < self.stride < self.max_length:
            raise ValueError(f"stride must be in (0, max_length={self.max_length}), got {self.stride}")

    def encode(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 [m], offsets int64 [m, 2]) per text, in the model's tokenisation, no specials."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True,
                             return_offsets_mapping=True,
                             return_attention_mask=False, verbose=False)
        return [(np.asarray(ids, dtype=np.int64), np.asarray(off, dtype=np.int64).reshape(-1, 2))
                for ids, off in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]

    def windows(self, n: int) -> list[tuple[int, int, int]]:
        """(start, end, first_kept): run on ids[start:end], keep outputs first_kept..end-1."""
        spans, start, done = [], 0, 0
        while done < n:
            end = min(start + self.max_length, n)
            spans.append((start, end, done))
            done, start = end, start + self.stride
        return spans

    @torch.no_grad()
    def run(self, ids_list: Sequence[np.ndarray], handle: Handler) -> None:
        """Log-softmax outputs for every position of every text, each from exactly one window."""
        jobs = [(i, *w) for i, ids in enumerate(ids_list) for w in self.windows(len(ids))]
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b:b + self.batch_size]
            width = max(end - start for _, start, end, _ in chunk)
            # Right padding: causal attention means real positions never see the pad (id 0, masked).
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (i, start, end, _) in enumerate(chunk):
                inputs[row, :end - start] = torch.from_numpy(ids_list[i][start:end])
                mask[row, :end - start] = 1
            logits = self.model(input_ids=inputs.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, (i, start, end, first) in enumerate(chunk):
                handle(i, first, torch.log_softmax(logits[row, first - start:end - start].float(), dim=-1))


def align_losses(our_offsets: np.ndarray, ref_offsets: np.ndarray, ref_losses: np.ndarray) -> np.ndarray:
    """float32 [n]: reference-token losses spread over characters and summed onto our tokens.

    our_offsets int [n, 2], ref_offsets int [m, 2]: char ranges [start, end) in the same text;
    ref_losses [m] (NaN = unknown). Rule in the module docstring.
    """
    ours = np.asarray(our_offsets, dtype=np.int64).reshape(-1, 2)
    ref = np.asarray(ref_offsets, dtype=np.int64).reshape(-1, 2)
    losses = np.asarray(ref_losses, dtype=np.float64)
    n_chars = int(max(ours.max(initial=0), ref.max(initial=0)))
    # Per character: loss density, covered by a reference token, covered by one without a loss.
    density, covered, unknown = np.zeros(n_chars), np.zeros(n_chars), np.zeros(n_chars)
    for (start, end), loss in zip(ref, losses, strict=True):
        if end > start:
            covered[start:end] = 1
            if np.isnan(loss):
                unknown[start:end] = 1
            else:
                density[start:end] += loss / (end - start)

    def per_token(values: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0.0], np.cumsum(values)])
        return cum[ours[:, 1]] - cum[ours[:, 0]]

    total = per_token(density)
    defined = (per_token(covered) > 0) & (per_token(unknown) == 0)
    return np.where(defined, total, np.nan).astype(np.float32)


def _check_offsets(text: str, offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(offsets) and (offsets.min() < 0 or offsets.max() > len(text)):
        raise ValueError(f"offsets reach char {int(offsets.max())} of a text of {len(text)} chars: "
                         f"they do not belong to this text")
    return offsets


class ReferenceScorer(_CharAlignedLM):
    """Per-token NLL of a reference causal LM, aligned to our tokens (for the Rho rule's excess loss)."""

    def token_losses(self, text: str, offsets: np.ndarray) -> np.ndarray:
        """float32 [n]: reference loss of each of our tokens (`offsets` [n, 2]); NaN where undefined."""
        return self.token_losses_batch([text], [offsets])[0]

    def token_losses_batch(self, texts: Sequence[str], offsets: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`token_losses` for many texts, their windows batched together."""
        offsets = [_check_offsets(t, o) for t, o in zip(texts, offsets, strict=True)]
        encoded = self.encode(texts)
        ref_losses = [np.full(len(ids), np.nan) for ids, _ in encoded]

        def handle(i: int, first: int, logp: torch.Tensor) -> None:
            ids = encoded[i][0]
            # Output j predicts token j + 1; the last output predicts past the text.
            nxt = torch.from_numpy(ids[first + 1:first + 1 + len(logp)]).to(logp.device)
            nll = -logp[:len(nxt)].gather(-1, nxt[:, None])[:, 0]
            ref_losses[i][first + 1:first + 1 + len(nxt)] = nll.cpu().numpy()

        self.run([ids for ids, _ in encoded], handle)
        return [align_losses(our, ref_off, loss)
                for our, (_, ref_off), loss in zip(offsets, encoded, ref_losses, strict=True)]


def first_token_table(our_tokenizer: PreTrainedTokenizerBase, judge_tokenizer: PreTrainedTokenizerBase
                      ) -> np.ndarray:
    """int64 [our vocab]: the judge's first token of each of our token strings; -1 for our special
    tokens and for strings that are not whole characters (a byte-level piece of a UTF-8 character)."""
    size = len(our_tokenizer)
    strings = [our_tokenizer.decode([v], clean_up_tokenization_spaces=False) for v in range(size)]
    special = set(our_tokenizer.all_special_ids)
    firsts = judge_tokenizer(strings, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return np.array([ids[0] if ids and v not in special and s and "\ufffd" not in s else -1
                     for v, (s, ids) in enumerate(zip(strings, firsts, strict=True))], dtype=np.int64)


class JudgeLabeler(_CharAlignedLM):
    """The judge's acceptable next tokens at each of our positions, in our vocabulary (judge rule)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 our_tokenizer: PreTrainedTokenizerBase, top_k: int, margin: float, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if top_k <= 0 or margin < 0:
            raise ValueError(f"JudgeLabeler needs top_k > 0 and margin >= 0, got {top_k}, {margin}")
        self.our_tokenizer = our_tokenizer
        self.top_k, self.margin = top_k, margin
        self.table = torch.from_numpy(first_token_table(our_tokenizer, tokenizer))

    def accept_sets(self, text: str, offsets: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """int32 [n, top_k]: our-vocab ids the judge accepts at each of our tokens, -1 padded.

        `ids` [n]: our token ids of the text (tokenised here with `our_tokenizer` when omitted).
        """
        return self.accept_sets_batch([text], [offsets], None if ids is None else [ids])[0]

    def accept_sets_batch(self, texts: Sequence[str], offsets: Sequence[np.ndarray],
                          ids: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        offsets = [_check_offsets(t, o) for t, o in zip(texts, offsets, strict=True)]
        if ids is None:
            ids = self._our_ids(texts, offsets)
        ids = [np.asarray(x, dtype=np.int64) for x in ids]
        encoded = self.encode(texts)
        out = [np.full((len(o), self.top_k), -1, dtype=np.int32) for o in offsets]
        # For each of our tokens, the judge output whose prefix ends exactly where our token starts.
        wanted = []
        for our, (_, judge_off) in zip(offsets, encoded, strict=True):
            ends = judge_off[:, 1]
            j = np.searchsorted(ends, our[:, 0], side="left")
            ok = (j < len(ends)) & (our[:, 0] > 0)
            ok[ok] &= ends[j[ok]] == our[ok, 0]
            wanted.append((np.flatnonzero(ok), j))

        def handle(i: int, first: int, logp: torch.Tensor) -> None:
            positions, j = wanted[i]
            here = positions[(j[positions] >= first) & (j[positions] < first + len(logp))]
            if len(here) == 0:
                return
            table = self.table.to(logp.device)
            rows = logp[torch.from_numpy(j[here] - first).to(logp.device)]          # [m, V_judge]
            scores = rows[:, table.clamp(min=0)].masked_fill(table < 0, -torch.inf)  # [m, V_ours]
            real = scores.gather(-1, torch.from_numpy(ids[i][here]).to(logp.device)[:, None])
            top, top_ids = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
            keep = (top >= real - self.margin) & torch.isfinite(real)
            out[i][here, :top.shape[-1]] = torch.where(keep, top_ids, -1).cpu().numpy()

        self.run([judge_ids for judge_ids, _ in encoded], handle)
        return out

    def _our_ids(self, texts: Sequence[str], offsets: Sequence[np.ndarray]) -> list[np.ndarray]:
        enc = self.our_tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True,
                                 return_attention_mask=False, verbose=False)
        for got, want in zip(enc["offset_mapping"], offsets, strict=True):
            if not np.array_equal(np.asarray(got).reshape(-1, 2), want):
                raise ValueError("accept_sets: offsets differ from our tokenizer's; pass `ids` explicitly")
        return [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
