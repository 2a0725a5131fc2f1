"""The LaCy method: which targets become `<CALL>`, and the objective that teaches them.

The model never sees a changed input; only targets change. At each step the current per-token losses
(detached) pick the delegated positions, which learn the target `<CALL>` under the full softmax; every
other real position learns its real token under the softmax *renormalised without* `<CALL>`, so
delegating never competes with ordinary prediction (the paper's modified NLL). Rules:

    plain         nothing selected
    lacy          fact positions whose loss is in the top `fact_share` of the batch's fact positions -> <CALL>
    loss          the budget's count of valid positions, by current loss              -> <CALL>
    rho           the budget's count by excess loss (loss - reference loss)           -> <CALL>
    judge         positions whose argmax prediction the judge rejects (≤ the budget, highest loss first) -> <CALL>
    ignore        as `loss`, but the selected targets are masked out (no loss) instead
    ignore_facts  as `lacy`, but masked out
    lacy_oracle   as `lacy`, over the exact fact positions of a synthetic corpus (the `oracle` column)

The budget is one number for every rule: with `match_lacy` (default) each batch's count is the number
LaCy delegates in that batch (round(fact_share x its fact positions)), so every rule trains at the same
call share, step by step; without it, a fixed `budget` share of the valid positions.

Selection is batch-level: shares are of the whole batch's positions, exact counts round(share * n)
(rounded half up), and ties are broken by position (earlier flattened index first), so a batch always
selects the same positions. With data-parallel ranks the batch is the global one: `lacy_step` takes a
`gather` that collects every rank's losses and masks, selects over all of them, and keeps its rows, so
two workers select exactly what one worker with the whole batch would.

Batch contract (`lacy_step`), one row per packed sequence of L = T + 1 tokens (see lacy.shards.format):
    input_ids     [B, L] long   inputs are [:, :-1], targets [:, 1:]
    fact          [B, L] bool   fact flag of each token; the flags of the TARGET tokens ([:, 1:]) count
    ref_loss      [B, L] float  optional; reference-model NLL of each token, NaN = unknown
    judge_accept  [B, L, k] int optional; our-vocab ids the judge accepts AT each token, -1 pad
    oracle        [B, L] int8   optional; exact attribute code of each token, 0 = none (synthetic corpora)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lacy.core.config import CALL_RULES, IGNORE_RULES, LabelConfig

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]
"""[b, ...] tensor of this rank -> (every rank's, concatenated along dim 0; this rank's first row in it)."""


def token_losses(logits: torch.Tensor, targets: torch.Tensor, call_id: int) -> torch.Tensor:
    """NLL of the real token under the softmax without `<CALL>`: logits [B,T,V], targets [B,T] -> [B,T].

    -log( exp(z_y) / sum_{v != CALL} exp(z_v) ), computed in float32 whatever the logits' dtype.
    """
    without_call = logits.float().index_fill(-1, _index(call_id, logits), -math.inf)
    # cross_entropy's fused log-softmax + NLL (and its softmax - onehot backward) is the cheap path.
    nll = F.cross_entropy(without_call.flatten(0, -2), targets.flatten(), reduction="none")
    return nll.view_as(targets)


def _index(token_id: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([token_id], device=like.device)


def _top_share(score: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` masked positions of highest score: [B,T] bool. Ties: earlier flattened index first."""
    selected = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    count = min(count, int(mask.sum()))
    if count > 0:
        flat = score.detach().float().masked_fill(~mask, -math.inf).flatten()
        order = torch.sort(flat, descending=True, stable=True).indices
        selected[order[:count]] = True
    return selected.view_as(mask)


def _share_count(share: float, n: int | torch.Tensor) -> int:
    """round(share * n), half up (Python's round would send 2.5 to 2)."""
    return int(math.floor(share * int(n) + 0.5))


def select(cfg: LabelConfig, loss: torch.Tensor, valid: torch.Tensor, fact: torch.Tensor | None = None,
           ref_loss: torch.Tensor | None = None, judge_bad: torch.Tensor | None = None) -> torch.Tensor:
    """Positions the rule selects, [B,T] bool; never outside `valid`. All inputs [B,T].

    loss: current (detached) real-token losses; fact: fact flags of the targets; ref_loss: reference
    NLL of the targets (NaN = unknown, never selected); judge_bad: the judge rejects the small model's
    prediction. Budgets count all valid positions, so rho and judge stay at (or below) the loss rule's
    call share even when reference or judge coverage is partial.
    """
    rule = cfg.rule
    if rule == "plain":
        return torch.zeros_like(valid)
    if rule in ("lacy", "ignore_facts", "lacy_oracle"):
        _require(fact, "fact", rule)
        facts = valid & fact
        return _top_share(loss, facts, _share_count(cfg.fact_share, facts.sum()))
    _require(ref_loss if rule == "rho" else judge_bad if rule == "judge" else loss,
             {"rho": "ref_loss", "judge": "judge_bad"}.get(rule, "loss"), rule)
    count = budget_count(cfg, valid, fact)
    if rule in ("loss", "ignore"):
        return _top_share(loss, valid, count)
    if rule == "rho":
        known = valid & ~torch.isnan(ref_loss)
        excess = loss - torch.nan_to_num(ref_loss, nan=0.0)
        return _top_share(excess, known, count)
    if rule == "judge":
        return _top_share(loss, valid & judge_bad, count)
    raise ValueError(f"labels.rule: unknown rule {rule!r}")


def budget_count(cfg: LabelConfig, valid: torch.Tensor, fact: torch.Tensor | None) -> int:
    """Positions a budgeted rule (loss, rho, judge, ignore) selects in this batch: LaCy's count
    (`match_lacy`), else round(budget x valid positions)."""
    if cfg.match_lacy:
        _require(fact, "fact", f"{cfg.rule} with labels.match_lacy")
        return _share_count(cfg.fact_share, (valid & fact).sum())
    return _share_count(cfg.budget, valid.sum())


def _require(value: torch.Tensor | None, name: str, rule: str) -> None:
    if value is None:
        raise ValueError(f"labels.rule={rule!r} needs {name!r} in the batch; "
                         f"score the shards with the matching scoring options")


def objective(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, selected: torch.Tensor,
              rule: str, call_id: int, real_nll: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The CALL objective: logits [B,T,V], targets/valid/selected [B,T] -> (scalar loss, stats).

    CALL rules: selected positions learn `<CALL>` under the full softmax (-log p(CALL)); the other
    valid positions learn their real token under the softmax without `<CALL>`. Ignore rules: selected
    positions get no loss. The loss is the mean over supervised positions. Stats are detached 0-d
    tensors (no device sync until read). `real_nll`: `token_losses(logits, ...)` when the caller has
    it already (with grad), to save a pass over the vocabulary.
    """
    logits = logits.float()
    call_logit = logits[..., call_id]
    if real_nll is None:
        real_nll = token_losses(logits, targets, call_id)
    # log sum_v exp(z_v) = logaddexp(log sum_{v != CALL} exp(z_v), z_CALL): exact, and it spares a
    # second pass over the vocabulary (forward and backward) — the objective's main cost.
    lse_without_call = real_nll + logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lse_full = torch.logaddexp(lse_without_call, call_logit)
    call_nll = lse_full - call_logit

    selected = selected & valid
    delegated = selected if rule in CALL_RULES else torch.zeros_like(selected)
    masked = selected if rule in IGNORE_RULES else torch.zeros_like(selected)
    if rule == "plain" and bool(selected.any()):
        raise ValueError("labels.rule='plain' selects nothing, but `selected` is not empty")
    real_supervised = valid & ~delegated & ~masked

    # where() rather than multiplication: an unselected position's (possibly inf) loss must not leak.
    per_token = torch.where(delegated, call_nll, torch.where(real_supervised, real_nll, 0.0))
    n_supervised = (delegated | real_supervised).sum()
    loss = per_token.sum() / n_supervised.clamp(min=1)

    n_valid = valid.sum().clamp(min=1)
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "real_loss": torch.where(valid, real_nll, 0.0).sum() / n_valid,
            "call_loss": torch.where(delegated, call_nll, 0.0).sum() / delegated.sum().clamp(min=1),
            "call_share": delegated.sum() / n_valid,
            "masked_share": masked.sum() / n_valid,
            "supervised_tokens": real_supervised.sum(),
            "valid_tokens": valid.sum(),
            "call_prob": torch.where(valid, (call_logit - lse_full).exp(), 0.0).sum() / n_valid,
        }
    return loss, stats


def judge_bad_from_accept(pred: torch.Tensor, accept: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The judge rejects the prediction: pred/target [B,T] ids, accept [B,T,k] ids (-1 pad) -> [B,T] bool.

    The real next token is always acceptable, whether or not it made the judge's top-k; a row of all
    -1 means the judge had no opinion there (e.g. no judge token boundary): not bad either.
    """
    known = (accept >= 0).any(dim=-1)
    accepted = (accept == pred.unsqueeze(-1)).any(dim=-1) | (pred == target)
    return known & ~accepted


def lacy_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: LabelConfig, call_id: int,
              eos_id: int | None = None, pad_id: int | None = None, gather: Gather | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass + the objective of rule `cfg.rule` on a batch (contract in the module docstring).

    `gather` (data-parallel training): select over the global batch, see the module docstring.

    Valid positions: targets that are not `pad_id`. Positions whose INPUT is `eos_id` (their target is
    the first token of the next packed document, unpredictable from the context) stay supervised with
    their real token (the model learns a prior over document starts) but are never selected: delegating
    them would hand the big model a question with no context.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    logits = model(input_ids=inputs).logits

    valid = torch.ones_like(targets, dtype=torch.bool)
    if pad_id is not None:
        valid &= targets != pad_id
    selectable = valid & (inputs != eos_id) if eos_id is not None else valid

    fact = _targets_of(batch, "fact", device)
    candidates = fact  # the fact positions a fact rule selects among
    if cfg.rule == "lacy_oracle":  # LaCy's selection over the true fact positions, not the proxy's
        _require(batch.get("oracle"), "oracle", cfg.rule)
        candidates = batch["oracle"][:, 1:].to(device) > 0
    ref_loss = _targets_of(batch, "ref_loss", device)
    if ref_loss is not None and cfg.rho_min_context > 0:
        ref_loss = _without_short_context(ref_loss, inputs, eos_id, cfg.rho_min_context)
    judge_bad = None
    if cfg.rule == "judge" and "judge_accept" in batch:
        # The small model's own prediction of a real token: argmax without <CALL>.
        best2 = logits.detach().topk(2, dim=-1).indices  # no copy of the logits, unlike masking
        pred = torch.where(best2[..., 0] == call_id, best2[..., 1], best2[..., 0])
        judge_bad = judge_bad_from_accept(pred, batch["judge_accept"][:, 1:].to(device), targets)

    real_nll = token_losses(logits, targets, call_id)
    current = real_nll.detach()  # selection never back-propagates
    if gather is None:
        selected = select(cfg, current, selectable, fact=candidates, ref_loss=ref_loss, judge_bad=judge_bad)
    else:
        selected = _select_global(cfg, gather, current, selectable, candidates, ref_loss, judge_bad)
    loss, stats = objective(logits, targets, valid, selected, cfg.rule, call_id, real_nll=real_nll)

    n_valid = valid.sum().clamp(min=1)
    n_selected = selected.sum().clamp(min=1)
    if fact is not None:
        stats["fact_share"] = (fact & valid).sum() / n_valid
        stats["selected_fact_share"] = (fact & selected).sum() / n_selected
    if ref_loss is not None:
        known = valid & ~torch.isnan(ref_loss)
        stats["ref_coverage"] = known.sum() / n_valid
        excess = torch.where(selected & known, current - ref_loss, 0.0)
        stats["selected_excess_loss"] = excess.sum() / n_selected
    if judge_bad is not None:
        stats["judge_bad_share"] = (judge_bad & valid).sum() / n_valid
    if "oracle" in batch:  # where the calls land, against the exact facts of a synthetic corpus
        oracle = batch["oracle"][:, 1:].to(device) > 0
        stats["oracle_share"] = (oracle & valid).sum() / n_valid
        stats["selected_oracle_share"] = (oracle & selected).sum() / n_selected
    stats["selected_loss"] = torch.where(selected, current, 0.0).sum() / n_selected
    return loss, stats


def _select_global(cfg: LabelConfig, gather: Gather, loss: torch.Tensor, selectable: torch.Tensor,
                   fact: torch.Tensor | None, ref_loss: torch.Tensor | None,
                   judge_bad: torch.Tensor | None) -> torch.Tensor:
    """`select` over every rank's rows; this rank's [b, T] part of the result."""
    (loss_all, first), (valid_all, _) = gather(loss), gather(selectable)
    extra = {name: gather(t)[0] for name, t in (("fact", fact), ("ref_loss", ref_loss), ("judge_bad", judge_bad))
             if t is not None}
    selected = select(cfg, loss_all, valid_all, **extra)
    return selected[first:first + loss.shape[0]]


def _without_short_context(ref_loss: torch.Tensor, inputs: torch.Tensor, eos_id: int | None,
                           min_context: int) -> torch.Tensor:
    """Reference losses made unknown (NaN) where the small model sees fewer than `min_context` tokens
    of the document: the reference scored whole documents, so at the start of a packed row that
    continues a document its loss had context the small model lacks, and excess loss is inflated.
    A document that starts inside the row (after an EOS) starts from nothing for both: kept."""
    t = torch.arange(inputs.shape[1], device=inputs.device)
    started_here = torch.cumsum(inputs == eos_id, dim=1) > 0 if eos_id is not None else torch.zeros_like(inputs,
                                                                                                      dtype=torch.bool)
    short = (t + 1 < min_context) & ~started_here
    return ref_loss.masked_fill(short, float("nan"))


def _targets_of(batch: dict[str, torch.Tensor], key: str, device: torch.device) -> torch.Tensor | None:
    """The target-aligned slice [:, 1:] of an optional per-token column."""
    return batch[key][:, 1:].to(device) if key in batch else None
