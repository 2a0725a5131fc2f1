"""The LaCy method: which targets become `<CALL>`, and the objective that teaches them.

The model never sees a changed input; only targets change. At each step the current per-token losses
(detached) pick the delegated positions, which learn the target `<CALL>` under the full softmax; every
other real position learns its real token under the softmax *renormalised without* `<CALL>`, so
delegating never competes with ordinary prediction (the paper's modified NLL). Rules:

    plain         nothing selected
    loss          top `budget` share of valid positions by current loss              -> <CALL>
    lacy          fact positions whose loss is in the top `fact_share` of the batch's fact positions -> <CALL>
    rho           top `budget` share by excess loss (loss - reference loss)           -> <CALL>
    judge         positions whose argmax prediction the judge rejects (≤ budget, highest loss first) -> <CALL>
    ignore        as `loss`, but the selected targets are masked out (no loss) instead
    ignore_facts  as `lacy`, but masked out

Selection is batch-level: shares are of the whole batch's positions, exact counts round(share * n)
(rounded half up), and ties are broken by position (earlier flattened index first), so a batch always
selects the same positions.

Batch contract (`lacy_step`), one row per packed sequence of L = T + 1 tokens (see lacy.shards):
    input_ids     [B, L] long   inputs are [:, :-1], targets [:, 1:]
    fact          [B, L] bool   fact flag of each token; the flags of the TARGET tokens ([:, 1:]) count
    ref_loss      [B, L] float  optional; reference-model NLL of each token, NaN = unknown
    judge_accept  [B, L, k] int optional; our-vocab ids the judge accepts AT each token, -1 pad
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lacy.config import LabelConfig

CALL_RULES = ("loss", "lacy", "rho", "judge")
"""Rules whose selected targets become <CALL>."""
IGNORE_RULES = ("ignore", "ignore_facts")
"""Rules whose selected targets are masked out of the loss."""


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
    n_valid = int(valid.sum())
    if rule == "plain":
        return torch.zeros_like(valid)
    if rule in ("loss", "ignore"):
        return _top_share(loss, valid, _share_count(cfg.budget, n_valid))
    if rule in ("lacy", "ignore_facts"):
        _require(fact, "fact", rule)
        facts = valid & fact
        return _top_share(loss, facts, _share_count(cfg.fact_share, facts.sum()))
    if rule == "rho":
        _require(ref_loss, "ref_loss", rule)
        known = valid & ~torch.isnan(ref_loss)
        excess = loss - torch.nan_to_num(ref_loss, nan=0.0)
        return _top_share(excess, known, _share_count(cfg.budget, n_valid))
    if rule == "judge":
        _require(judge_bad, "judge_bad", rule)
        return _top_share(loss, valid & judge_bad, _share_count(cfg.budget, n_valid))
    raise ValueError(f"labels.rule: unknown rule {rule!r}")


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


def judge_bad_from_accept(pred: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
    """The judge rejects the prediction: pred [B,T] ids, accept [B,T,k] ids (-1 pad) -> [B,T] bool.

    A row of all -1 means the judge had no opinion there (e.g. no judge token boundary): not bad.
    """
    known = (accept >= 0).any(dim=-1)
    accepted = (accept == pred.unsqueeze(-1)).any(dim=-1)
    return known & ~accepted


def lacy_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: LabelConfig, call_id: int,
              eos_id: int | None = None, pad_id: int | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass + the objective of rule `cfg.rule` on a batch (contract in the module docstring).

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
    ref_loss = _targets_of(batch, "ref_loss", device)
    judge_bad = None
    if cfg.rule == "judge" and "judge_accept" in batch:
        # The small model's own prediction of a real token: argmax without <CALL>.
        best2 = logits.detach().topk(2, dim=-1).indices  # no copy of the logits, unlike masking
        pred = torch.where(best2[..., 0] == call_id, best2[..., 1], best2[..., 0])
        judge_bad = judge_bad_from_accept(pred, batch["judge_accept"][:, 1:].to(device))

    real_nll = token_losses(logits, targets, call_id)
    current = real_nll.detach()  # selection never back-propagates
    selected = select(cfg, current, selectable, fact=fact, ref_loss=ref_loss, judge_bad=judge_bad)
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
    stats["selected_loss"] = torch.where(selected, current, 0.0).sum() / n_selected
    return loss, stats


def _targets_of(batch: dict[str, torch.Tensor], key: str, device: torch.device) -> torch.Tensor | None:
    """The target-aligned slice [:, 1:] of an optional per-token column."""
    return batch[key][:, 1:].to(device) if key in batch else None
