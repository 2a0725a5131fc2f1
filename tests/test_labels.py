"""The labelling rules and the CALL objective against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lacy.core.config import LabelConfig
from lacy.labels.method import judge_bad_from_accept, lacy_step, objective, select, token_losses

CALL = 2  # the <CALL> id in the hand-made 3- or 4-token vocabularies below


def test_token_losses_renormalise_without_call():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]]])
    targets = torch.tensor([[0, 1]])
    got = token_losses(logits, targets, CALL)
    # -log(e^1 / (e^1 + e^2)) = log(1 + e); the CALL logit (3, then 5) plays no part.
    expected = torch.tensor([[math.log(1 + math.e), math.log(2.0)]])
    torch.testing.assert_close(got, expected)


def test_token_losses_match_explicit_softmax_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[0, 1, 3, 6], [5, 4, 0, 1]])
    p = torch.exp(logits)
    p[..., CALL] = 0.0
    p = p / p.sum(-1, keepdim=True)
    expected = -torch.log(p.gather(-1, targets[..., None])[..., 0])
    torch.testing.assert_close(token_losses(logits, targets, CALL), expected)


def test_objective_call_and_real_targets():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 1, 0]])
    valid = torch.tensor([[True, True, False]])
    selected = torch.tensor([[True, False, True]])  # the invalid third position must be ignored
    loss, stats = objective(logits, targets, valid, selected, "loss", CALL)
    call_nll = -math.log(math.e**3 / (math.e + math.e**2 + math.e**3))  # full softmax
    real_nll = math.log(1 + math.exp(-1))  # -log(e^2 / (e^1 + e^2))
    assert loss.item() == pytest.approx((call_nll + real_nll) / 2, rel=1e-6)
    assert stats["call_share"].item() == pytest.approx(0.5)
    assert stats["masked_share"].item() == 0.0
    assert stats["supervised_tokens"].item() == 1
    # real_loss: renormalised NLL of the real token at every valid position, delegated or not.
    assert stats["real_loss"].item() == pytest.approx((math.log(1 + math.e) + real_nll) / 2, rel=1e-6)


def test_objective_ignore_masks_selected_targets():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
    targets = torch.tensor([[0, 1]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    selected = torch.tensor([[True, False]])
    loss, stats = objective(logits, targets, valid, selected, "ignore", CALL)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert stats["call_share"].item() == 0.0
    assert stats["masked_share"].item() == pytest.approx(0.5)
    assert stats["supervised_tokens"].item() == 1


def test_objective_gradient_reaches_call_only_where_delegated():
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    loss, _ = objective(logits, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool),
                        torch.tensor([[True, False]]), "lacy", CALL)
    loss.backward()
    # Real-token position: renormalised softmax, so <CALL>'s logit gets no gradient.
    assert logits.grad[0, 1, CALL].item() == 0.0
    # Delegated position: -log p(CALL) under the full softmax, d/dz_CALL = (p_CALL - 1) / 2 = (1/3 - 1) / 2.
    assert logits.grad[0, 0, CALL].item() == pytest.approx((1 / 3 - 1) / 2)


def test_plain_objective_refuses_a_selection():
    with pytest.raises(ValueError, match="plain"):
        everything = torch.ones(1, 1, dtype=torch.bool)
        objective(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), everything, everything,
                  "plain", CALL)


# ---------------------------------------------------------------------------------------------
# select(): exact positions on a hand-made batch of 2 x 5 positions

LOSS = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0],
                     [2.0, 8.0, 4.0, 6.0, 0.5]])
VALID = torch.ones(2, 5, dtype=torch.bool)
FACT = torch.tensor([[True, False, True, False, True],
                     [False, True, True, False, False]])


def _positions(mask: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(p) for p in mask.nonzero().tolist()]


def test_select_plain_selects_nothing():
    assert not select(LabelConfig(rule="plain"), LOSS, VALID).any()


@pytest.mark.parametrize("rule", ["loss", "ignore"])
def test_select_loss_takes_top_budget_of_valid(rule):
    cfg = LabelConfig(rule=rule, budget=0.2, match_lacy=False)  # round(0.2 * 10) = 2
    assert _positions(select(cfg, LOSS, VALID)) == [(0, 2), (1, 1)]  # losses 9 and 8
    valid = VALID.clone()
    valid[0, 2] = False  # 9 is padding now; 9 valid -> round(1.8) = 2: losses 8 and 7
    assert _positions(select(cfg, LOSS, valid)) == [(0, 4), (1, 1)]


def test_select_counts_round_half_up():
    cfg = LabelConfig(rule="loss", budget=0.25, match_lacy=False)  # 0.25 * 10 = 2.5 -> 3
    assert select(cfg, LOSS, VALID).sum().item() == 3


def test_select_ties_go_to_the_earlier_position():
    cfg = LabelConfig(rule="loss", budget=0.2, match_lacy=False)
    flat = torch.ones(2, 5)
    assert _positions(select(cfg, flat, VALID)) == [(0, 0), (0, 1)]


@pytest.mark.parametrize("rule", ["lacy", "ignore_facts"])
def test_select_lacy_takes_top_share_of_fact_positions(rule):
    # Fact losses: 5, 9, 7 (row 0) and 8, 4 (row 1); 0.6 * 5 = 3 -> 9, 8, 7.
    cfg = LabelConfig(rule=rule, fact_share=0.6)
    assert _positions(select(cfg, LOSS, VALID, fact=FACT)) == [(0, 2), (0, 4), (1, 1)]
    with pytest.raises(ValueError, match="fact"):
        select(cfg, LOSS, VALID)


def test_select_rho_uses_excess_loss_and_skips_unknown_reference():
    ref = torch.tensor([[4.0, 0.0, 8.5, float("nan"), 1.0],
                        [0.0, 7.0, float("nan"), 1.0, 0.0]])
    # Excess: [1, 1, 0.5, -, 6], [2, 1, -, 5, 0.5]; budget round(0.3 * 10) = 3 -> 6, 5, 2.
    cfg = LabelConfig(rule="rho", budget=0.3, match_lacy=False)
    assert _positions(select(cfg, LOSS, VALID, ref_loss=ref)) == [(0, 4), (1, 0), (1, 3)]
    # Only one known position: the budget is capped by what is known, never filled with NaNs.
    only_one = torch.full_like(ref, float("nan"))
    only_one[1, 4] = 0.0
    assert _positions(select(cfg, LOSS, VALID, ref_loss=only_one)) == [(1, 4)]


def test_select_judge_caps_bad_positions_by_loss():
    bad = torch.tensor([[True, True, False, True, True],
                        [False, False, False, True, False]])
    cfg = LabelConfig(rule="judge", budget=0.3, match_lacy=False)  # 3 of the 5 bad ones: losses 7, 6, 5
    assert _positions(select(cfg, LOSS, VALID, judge_bad=bad)) == [(0, 0), (0, 4), (1, 3)]
    few = torch.zeros_like(bad)
    few[0, 1] = True  # fewer bad than budget: all of them, however low their loss
    assert _positions(select(cfg, LOSS, VALID, judge_bad=few)) == [(0, 1)]


def test_judge_bad_from_accept():
    pred = torch.tensor([[3, 4, 5]])
    accept = torch.tensor([[[3, 9], [1, -1], [-1, -1]]])
    # accepted; rejected; unknown (all -1) -> not bad
    assert judge_bad_from_accept(pred, accept, torch.tensor([[0, 0, 0]])).tolist() == [[False, True, False]]
    # The real next token is acceptable even when the judge's top-k left it out.
    assert judge_bad_from_accept(pred, accept, torch.tensor([[0, 4, 0]])).tolist() == [[False, False, False]]


# ---------------------------------------------------------------------------------------------
# lacy_step() on a real tiny GPT-2: batch contract, EOS and padding, call share of every rule

VOCAB, EOS, PAD, STEP_CALL = 32, 1, 0, 2


@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(cfg).eval()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 21), generator=g)
    ids[0, 7] = EOS  # a document boundary: target at input position 7 is never selected
    ids[3, 17:] = PAD  # padding at the end of the last row
    fact = torch.rand(4, 21, generator=g) < 0.3
    ref = torch.rand(4, 21, generator=g) * 5
    ref[1, 4] = float("nan")
    accept = torch.randint(3, VOCAB, (4, 21, 3), generator=g)
    accept[2, 5] = -1
    return {"input_ids": ids, "fact": fact, "ref_loss": ref, "judge_accept": accept}


@pytest.mark.parametrize("rule", ["plain", "loss", "lacy", "rho", "judge", "ignore", "ignore_facts"])
def test_lacy_step_share_matches_budget(tiny_gpt2, rule):
    cfg = LabelConfig(rule=rule, budget=0.15, fact_share=0.6, match_lacy=False)
    batch = _batch()
    loss, stats = lacy_step(tiny_gpt2, batch, cfg, STEP_CALL, eos_id=EOS, pad_id=PAD)
    assert torch.isfinite(loss)
    n_valid = 4 * 20 - 4  # 4 padded targets
    assert stats["valid_tokens"].item() == n_valid
    fact_targets = batch["fact"][:, 1:] & (batch["input_ids"][:, 1:] != PAD)
    fact_targets[0, 7] = False  # after EOS: not selectable
    n_selected = {"plain": 0, "loss": round(0.15 * n_valid), "rho": round(0.15 * n_valid),
                  "lacy": math.floor(0.6 * int(fact_targets.sum()) + 0.5)}
    n_selected["ignore"], n_selected["ignore_facts"] = n_selected["loss"], n_selected["lacy"]
    call = stats["call_share"].item() * n_valid
    masked = stats["masked_share"].item() * n_valid
    if rule == "judge":
        assert 0 < call <= n_selected["loss"]
        assert stats["judge_bad_share"].item() > 0
    elif rule in ("ignore", "ignore_facts"):
        assert call == 0 and masked == pytest.approx(n_selected[rule])
    else:
        assert call == pytest.approx(n_selected[rule]) and masked == 0
    assert stats["supervised_tokens"].item() == pytest.approx(n_valid - call - masked)


def test_lacy_step_never_selects_after_eos_and_matches_explicit_loss(tiny_gpt2):
    batch = _batch()
    ids = batch["input_ids"]
    cfg = LabelConfig(rule="loss", budget=0.5, match_lacy=False)
    loss, stats = lacy_step(tiny_gpt2, batch, cfg, STEP_CALL, eos_id=EOS, pad_id=PAD)
    with torch.no_grad():
        logits = tiny_gpt2(input_ids=ids[:, :-1]).logits
    targets = ids[:, 1:]
    valid = targets != PAD
    current = token_losses(logits, targets, STEP_CALL)
    selectable = valid.clone()
    selectable[0, 7] = False
    selected = select(cfg, current, selectable)
    assert not selected[0, 7]
    # The loss, written out: full-softmax CALL NLL where selected, renormalised NLL elsewhere.
    logp = torch.log_softmax(logits, -1)
    expected = torch.where(selected, -logp[..., STEP_CALL], current)[valid].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["real_loss"].item() == pytest.approx(current[valid].mean().item(), rel=1e-5)


def test_lacy_step_names_missing_columns(tiny_gpt2):
    batch = {"input_ids": _batch()["input_ids"]}
    with pytest.raises(ValueError, match="ref_loss"):
        lacy_step(tiny_gpt2, batch, LabelConfig(rule="rho"), STEP_CALL)
    with pytest.raises(ValueError, match="judge_bad"):
        lacy_step(tiny_gpt2, batch, LabelConfig(rule="judge"), STEP_CALL)


def test_lacy_step_judge_rejects_exactly_the_unaccepted_predictions(tiny_gpt2):
    batch = _batch()
    ids = batch["input_ids"]
    with torch.no_grad():
        logits = tiny_gpt2(input_ids=ids[:, :-1]).logits
    logits[..., STEP_CALL] = -math.inf  # the small model's prediction of a real token: never <CALL>
    pred = logits.argmax(-1)
    accept = torch.full((4, 21, 2), -1)
    accept[:, 1:, 0] = pred  # the judge accepts every prediction ...
    accept[1, 3 + 1, 0] = (pred[1, 3] + 1) % VOCAB  # ... but two
    accept[2, 9 + 1, 0] = (pred[2, 9] + 1) % VOCAB
    accept[2, 9 + 1, 1] = (pred[2, 9] + 2) % VOCAB
    batch["judge_accept"] = accept
    _, stats = lacy_step(tiny_gpt2, batch, LabelConfig(rule="judge"), STEP_CALL, eos_id=EOS, pad_id=PAD)
    assert stats["judge_bad_share"].item() * stats["valid_tokens"].item() == pytest.approx(2)
    assert stats["call_share"].item() * stats["valid_tokens"].item() == pytest.approx(2)


@pytest.mark.parametrize("rule", ["loss", "rho", "judge", "ignore"])
def test_budgeted_rules_match_lacys_count_in_every_batch(tiny_gpt2, rule):
    """One budget: by default every budgeted rule selects, batch by batch, exactly as many positions as
    LaCy does in that batch (not a fixed 15 % beside LaCy's 0.6 x fact share)."""
    for seed in range(3):
        batch = _batch(seed)
        batch["judge_accept"][..., 0] = -1  # judge: most predictions rejected, so the budget binds
        batch["judge_accept"][..., 1:] = 0
        _, lacy = lacy_step(tiny_gpt2, batch, LabelConfig(rule="lacy"), STEP_CALL, eos_id=EOS, pad_id=PAD)
        _, other = lacy_step(tiny_gpt2, batch, LabelConfig(rule=rule), STEP_CALL, eos_id=EOS, pad_id=PAD)
        share = other["masked_share"] if rule == "ignore" else other["call_share"]
        assert share.item() == pytest.approx(lacy["call_share"].item())


def test_rho_ignores_row_starts_that_continue_a_document(tiny_gpt2):
    """A row that continues a document: its first positions saw little context, the reference saw the
    whole document, so a low reference loss there is not evidence of anything."""
    batch = _batch()
    batch["input_ids"][1:, :] = torch.randint(3, VOCAB, (3, 21), generator=torch.Generator().manual_seed(5))
    batch["ref_loss"] = torch.full((4, 21), 50.0)
    batch["ref_loss"][:, 1:4] = -50.0  # huge excess loss at the targets of input positions 0..2
    cfg = LabelConfig(rule="rho", match_lacy=False, budget=0.05, rho_min_context=8)
    selected = {}
    for min_context in (0, 8):
        cfg.rho_min_context = min_context
        with torch.no_grad():
            _, stats = lacy_step(tiny_gpt2, batch, cfg, STEP_CALL, eos_id=EOS, pad_id=PAD)
        selected[min_context] = stats["selected_excess_loss"].item()
    assert selected[0] > 50  # without the rule the row starts win
    assert selected[8] < 10  # with it they are never chosen


def _rank_selects(rank: int, world: int, init: str, batch: dict, out: str) -> None:
    import torch.distributed as dist

    from jobs.pretrain import _collectives

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    _, gather = _collectives(torch.device("cpu"))
    per = batch["input_ids"].shape[0] // world
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=EOS, eos_token_id=EOS)).eval()
    local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    for rule in ("loss", "lacy", "rho"):
        with torch.no_grad():
            _, stats = lacy_step(model, local, LabelConfig(rule=rule), STEP_CALL, eos_id=EOS, pad_id=PAD,
                                 gather=gather)
        torch.save(stats["call_share"] * stats["valid_tokens"], f"{out}.{rule}.{rank}")
        # The positions themselves, on fixed losses (no model rounding between batch shapes).
        from lacy.labels.method import _select_global

        mask = _select_global(LabelConfig(rule=rule), gather, batch["loss"][rank * per:(rank + 1) * per],
                              torch.ones_like(local["fact"][:, 1:]), local["fact"][:, 1:], local["ref_loss"][:, 1:],
                              None)
        torch.save(mask, f"{out}.{rule}.mask{rank}")
    dist.destroy_process_group()


def test_two_ranks_select_what_one_rank_with_the_whole_batch_selects(tmp_path):
    """Selection is over the global batch: two data-parallel ranks (real gloo process group) delegate
    exactly the positions one worker holding both halves delegates."""
    import torch.multiprocessing as mp

    batch = _batch(3)
    batch["fact"][2:] = True  # the halves differ a lot: per-rank selection would differ from global
    batch["ref_loss"][2:] = 0.0
    batch["loss"] = torch.rand(4, 20, generator=torch.Generator().manual_seed(9)) * 5
    mp.spawn(_rank_selects, args=(2, f"file://{tmp_path / 'store'}", batch, str(tmp_path / "calls")), nprocs=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=EOS, eos_token_id=EOS)).eval()
    for rule in ("loss", "lacy", "rho"):
        with torch.no_grad():
            _, whole = lacy_step(model, batch, LabelConfig(rule=rule), STEP_CALL, eos_id=EOS, pad_id=PAD)
        per_rank = [torch.load(tmp_path / f"calls.{rule}.{r}").item() for r in range(2)]
        assert sum(per_rank) == pytest.approx((whole["call_share"] * whole["valid_tokens"]).item()), rule
        assert per_rank[0] != per_rank[1]  # the global batch, not two local ones, set each rank's count
        masks = torch.cat([torch.load(tmp_path / f"calls.{rule}.mask{r}") for r in range(2)])
        valid = torch.ones(4, 20, dtype=torch.bool)
        assert torch.equal(masks, select(LabelConfig(rule=rule), batch["loss"], valid, batch["fact"][:, 1:],
                                         batch["ref_loss"][:, 1:])), rule
