"""lacy.eval.plan: the evaluation plan as data, and who is evaluated (never the people thresholds are set on)."""

from __future__ import annotations

import pytest

from lacy.core.config import load_config
from lacy.corpus.corpora import corpus_for
from lacy.corpus.readers import split_of
from lacy.eval.plan import System, evaluation_plan, population


def test_the_plan_has_every_trigger_unit_and_seed_and_the_budget_matched_big_model_last():
    cfg = load_config("configs/synthbio.yaml", ["--experiment.units", "[word, entity]"])
    models = ["plain-steps", "lacy-steps", "lacy-steps-seed1"]
    plan = evaluation_plan(cfg, models)
    assert System("plain-steps", "retrieval", "random", 0.6, unit="entity") in plan
    assert System("plain-steps", "retrieval", "combined", 0.22, unit="word") not in plan  # needs <CALL>
    assert System("lacy-steps-seed1", "retrieval", "combined", 0.1, unit="word") in plan
    cascades = [s for s in plan if s.small and s.big]
    assert len(cascades) == (2 + 4 + 4) * 4 * 2  # (plain's 2 + lacy's 4 triggers per seed) x 4 rates x 2 units
    assert plan[-1] == System(None, "retrieval", budget=True) and plan[-1].name == "big-retrieval (budget)"
    assert System("lacy-steps", "retrieval", "p_call", 0.22, unit="entity").name == \
        "lacy-steps+retrieval@0.22/p_call/entity"


def test_the_budget_matched_big_model_is_cut_at_a_word_border():
    from lacy.eval.generate import Generated
    from lacy.eval.plan import _cut

    out = Generated("Anna was born on May 3, 1952 in Oslo.", [("Anna", "prompt"), (" was born on May 3, 1952 in Oslo.",
                                                                                  "big")])
    cut = _cut(out, "Anna", 18)
    assert cut.text == "Anna was born on May" and cut.spans == [("Anna", "prompt"), (" was born on May", "big")]
    assert _cut(out, "Anna", 500).text == out.text


def test_rows_are_written_in_groups_of_whole_models_seed_by_seed():
    """Evaluation writes (and caches) rows a group at a time: whole small models in plan order, so a run
    stopped midway has its first seeds complete; the big model alone last."""
    from lacy.eval.plan import _groups

    cfg = load_config("configs/synthbio.yaml", [])
    models = ["plain-steps", "loss-steps", "lacy-steps", "plain-steps-seed1", "loss-steps-seed1", "lacy-steps-seed1"]
    plan = evaluation_plan(cfg, models)
    todo = {s: {"people": [None] * 200} for s in plan if not s.budget}
    groups = _groups(list(todo), todo, 8 * 256)
    assert [sorted({s.small for s in g}, key=str) for g in groups] == [
        ["loss-steps", "plain-steps"], ["lacy-steps"], ["loss-steps-seed1", "plain-steps-seed1"],
        ["lacy-steps-seed1"], [None]]
    assert [s for g in groups for s in g] == [s for s in todo if s.small] + [s for s in todo if not s.small]
    assert len(_groups(list(todo), todo, 0)) == len(models) + 1  # at least 0: every model a group


def test_plan_pairs_each_model_with_the_triggers_it_can_use():
    cfg = load_config("configs/tiny.yaml", ["--eval.call_rates", "[0.1, 0.22]", "--eval.heldout_entities", "3"])
    plan = evaluation_plan(cfg, ["plain-steps", "lacy-steps", "ignore_facts-steps"])
    names = [s.name for s in plan]
    assert len(names) == len(set(names))
    assert {"big-plain", "big-retrieval", "plain-steps alone", "lacy-steps alone"} <= set(names)
    # P(<CALL>) only for a model trained to emit it: plain and the Ignore ablations never saw <CALL>.
    assert System("plain-steps", "plain", "p_call", 0.22) not in plan
    assert System("ignore_facts-steps", "retrieval", "p_call", 0.22) not in plan
    assert System("plain-steps", "plain", "confidence", 0.22) in plan
    assert System("lacy-steps", "retrieval", "p_call", 0.1) in plan
    assert System("lacy-steps", "retrieval", "confidence", 0.1) in plan
    heldout = [s for s in plan if s.people == "heldout"]
    assert heldout and all(s.rate == cfg.experiment.headline_rate for s in heldout)


def test_population_evaluates_trained_on_people_and_calibrates_on_others():
    cfg = load_config("configs/default.yaml", ["--eval.entities", "20", "--eval.calibration_entities", "10",
                                               "--eval.heldout_entities", "5"])
    pop = population(cfg, corpus_for(cfg))
    split = lambda e: split_of(e.doc_id, cfg.data.val_fraction)  # noqa: E731
    assert len(pop.train) == 20 and all(split(e) == "train" for e in pop.train)
    assert len(pop.calibration) == 10 and all(split(e) == "train" for e in pop.calibration)
    assert not {e.doc_id for e in pop.train} & {e.doc_id for e in pop.calibration}
    assert pop.heldout and all(split(e) == "val" for e in pop.heldout)
    assert all(e.doc_id in pop.articles for e in [*pop.train, *pop.heldout])
    # The articles facts are checked against carry the description (life years of embedded people).
    assert any("(" in pop.articles[e.doc_id]["text"].split("\n\n")[-1] for e in pop.train)


def test_local_generator_decodes_every_request_on_the_one_compute_thread(tmp_path, tiny_tokenizer):
    # Evaluation asks from several threads (experiment.eval_concurrency); forwards spread over threads
    # run slower under libgomp (lacy.core.compute), and unbatched concurrency gains nothing on a CPU.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from lacy.core.compute import compute_thread
    from lacy.core.config import ModelConfig
    from lacy.eval.generate import LocalGenerator, Request
    from lacy.model import build_model

    paths = {}
    for name, seed in (("small", 0), ("big", 1)):
        torch.manual_seed(seed)
        build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    cfg = load_config(None, ["--run_dir", str(tmp_path), "--big.path", paths["big"],
                             "--cascade.word_start_only", "false"])
    gen = LocalGenerator(cfg, {"lacy": paths["small"]})
    threads: set[int] = set()
    models = [gen.small["lacy"][0], gen.big.model]
    hooks = [m.register_forward_pre_hook(lambda *_: threads.add(threading.get_ident())) for m in models]
    request = Request("The river", "lacy", "plain", threshold=float("-inf"), max_tokens=6)  # every point calls
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: gen.generate(request), range(8)))
    for hook in hooks:
        hook.remove()
    assert all(out.calls > 0 for out in outs) and len({out.text for out in outs}) == 1
    assert threads == {compute_thread().ident}, f"{len(threads)} threads ran forwards"


def test_the_big_model_alone_writes_in_batches_what_it_writes_one_by_one(tmp_path, tiny_tokenizer):
    """generate_many (the big-alone rows: `eval.batch_people` people per batch, not Serve's `big_batch`)
    writes the texts generate writes for each request alone; prompts of different lengths share a padded
    batch."""
    import torch

    from lacy.core.config import ModelConfig
    from lacy.eval.generate import LocalGenerator, Request
    from lacy.model import build_model

    torch.manual_seed(1)
    build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).save_pretrained(tmp_path / "big")
    tiny_tokenizer.save_pretrained(tmp_path / "big")
    cfg = load_config(None, ["--run_dir", str(tmp_path), "--big.path", str(tmp_path / "big"),
                             "--eval.batch_people", "3", "--serve.big_batch", "1"])
    gen = LocalGenerator(cfg, {})
    widths, continue_batch = [], gen.big.continue_batch
    gen.big.continue_batch = lambda calls: widths.append(len(calls)) or continue_batch(calls)
    requests = [Request(prompt, None, "plain", max_tokens=7) for prompt in
                ("The river", "Ada Lovelace was born in", "Paris", "The capital of France is")]
    batched = gen.generate_many(requests)
    assert widths == [3, 1]
    alone = [gen.generate(r) for r in requests]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert [b.spans for b in batched] == [a.spans for a in alone]
    with pytest.raises(ValueError, match=r"no small model \['lacy'\] here"):
        gen.generate_many([Request("x", "lacy", "plain")])


def test_calibrate_command_holds_the_rate_with_calls_on_for_the_configs_calibration_people(tmp_path, tiny_tokenizer):
    """`python -m lacy.calibrate`: the closed-loop threshold of one model on the calibration people of any
    corpus with people (here the synthetic one), written with the config beside it."""
    import json

    import numpy as np
    import torch

    from lacy.calibrate import main
    from lacy.cascade.engine import Cascade
    from lacy.cascade.lm import SmallLM
    from lacy.core.config import ModelConfig
    from lacy.eval.generate import LocalGenerator, Request, bio_prompt
    from lacy.model import build_model

    for name, seed in (("small", 0), ("big", 1)):
        torch.manual_seed(seed)
        build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    args = ["--config", "configs/synthbio-tiny.yaml", "--run_dir", str(tmp_path / "run"), "--big.path",
            str(tmp_path / "big"), "--small", str(tmp_path / "small"), "--rate", "0.3", "--trigger", "confidence",
            "--big", "plain", "--cascade.max_new_tokens", "12"]
    result = main(args)
    saved = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert saved == result and (tmp_path / "run" / "calibration.config.yaml").is_file()
    cfg = load_config("configs/synthbio-tiny.yaml", ["--run_dir", str(tmp_path / "run"), "--big.path",
                                                     str(tmp_path / "big"), "--cascade.max_new_tokens", "12"])
    people = population(cfg, corpus_for(cfg)).calibration
    assert saved["people"] == len(people) == cfg.eval.calibration_entities
    # The realised rate is what decoding those people with calls on at the threshold gives.
    gen = LocalGenerator(cfg, {"small": str(tmp_path / "small")})
    outs = [gen.generate(Request(bio_prompt(e, "name"), "small", "plain", "confidence", saved["log_odds"], 12,
                                 topic=e.name)) for e in people]
    assert saved["realised_rate"] == pytest.approx(sum(o.calls for o in outs) / sum(o.decision_points for o in outs))
    assert abs(saved["realised_rate"] - 0.3) <= cfg.eval.calibration_tolerance or saved["rounds"] == 3
    # With no closed-loop rounds it is the open-loop quantile of the scores with calls off.
    open_loop = main([*args, "--eval.calibration_rounds", "0", "--out", str(tmp_path / "open.json")])
    cascade = Cascade(SmallLM(*gen.small["small"]), None, cfg.cascade)
    scores = [x for e in people for x in cascade.generate(e.name, allow_calls=False, trigger="confidence").call_scores]
    assert open_loop["log_odds"] == pytest.approx(float(np.quantile(scores, 0.7))) and open_loop["rounds"] == 0
    with pytest.raises(SystemExit, match="--small"):
        main(["--config", "configs/synthbio-tiny.yaml", "--rate", "0.2"])


def test_cached_thresholds_answer_only_for_the_same_question(tmp_path, tiny_tokenizer):
    """results/thresholds.json is keyed by everything that changes it: adding a trigger to a run
    recalibrates (it once reused the file without the new trigger's thresholds)."""
    import torch

    from lacy.core.config import ModelConfig
    from lacy.eval.generate import LocalGenerator
    from lacy.eval.plan import thresholds_stage
    from lacy.model import build_model

    for name, seed in (("lacy-steps", 0), ("big", 1)):
        torch.manual_seed(seed)
        build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    overrides = ["--run_dir", str(tmp_path / "run"), "--big.path", str(tmp_path / "big"), "--experiment.big_models",
                 "[plain]", "--cascade.max_new_tokens", "8", "--eval.calibration_rounds", "1"]
    cfg = load_config("configs/synthbio-tiny.yaml", overrides)
    pop, models = population(cfg, corpus_for(cfg)), {"lacy-steps": str(tmp_path / "lacy-steps")}
    gen = LocalGenerator(cfg, models)
    first = thresholds_stage(cfg, models, {"lacy-steps": "k1"}, pop, gen)
    assert set(first) == {"lacy-steps+plain/p_call/0.22"}
    path = tmp_path / "run" / "results" / "thresholds.json"
    stamp = path.stat().st_mtime_ns
    assert thresholds_stage(cfg, models, {"lacy-steps": "k1"}, pop, gen) == first and path.stat().st_mtime_ns == stamp
    both = load_config("configs/synthbio-tiny.yaml", [*overrides, "--experiment.triggers", "[p_call, confidence]"])
    assert set(thresholds_stage(both, models, {"lacy-steps": "k1"}, pop, gen)) == {
        "lacy-steps+plain/p_call/0.22", "lacy-steps+plain/confidence/0.22"}
    stamp = path.stat().st_mtime_ns
    fewer = population(cfg, corpus_for(cfg))
    fewer.calibration_groups = [g[:2] for g in fewer.calibration_groups]  # other people: calibrated again
    thresholds_stage(both, models, {"lacy-steps": "k1"}, fewer, gen)
    assert path.stat().st_mtime_ns != stamp


def test_a_run_that_adds_a_model_calibrates_only_that_model(tmp_path, tiny_tokenizer):
    """Adding seeds to a run keeps its first models and their thresholds: only the new model's
    calibration people are decoded (it once recalibrated every model of the run)."""
    import torch

    from lacy.core.config import ModelConfig
    from lacy.eval.generate import LocalGenerator
    from lacy.eval.plan import thresholds_stage
    from lacy.model import build_model

    for name, seed in (("lacy-steps", 0), ("lacy-steps-seed1", 2), ("big", 1)):
        torch.manual_seed(seed)
        build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    cfg = load_config("configs/synthbio-tiny.yaml", [
        "--run_dir", str(tmp_path / "run"), "--big.path", str(tmp_path / "big"), "--experiment.big_models", "[plain]",
        "--cascade.max_new_tokens", "8", "--eval.calibration_rounds", "1", "--experiment.seeds", "[0, 1]"])
    pop = population(cfg, corpus_for(cfg))
    models = {name: str(tmp_path / name) for name in ("lacy-steps", "lacy-steps-seed1")}
    keys = {"lacy-steps": "k1", "lacy-steps-seed1": "k2"}

    class Counted(LocalGenerator):
        asked: list[str]

        def generate_many(self, requests):
            self.asked += [r.model for r in requests]
            return super().generate_many(requests)

    gen = Counted(cfg, models)
    gen.asked = []
    first = thresholds_stage(cfg, {"lacy-steps": models["lacy-steps"]}, keys, pop, gen, {"lacy-steps": 0})
    gen.asked.clear()
    both = thresholds_stage(cfg, models, keys, pop, gen, {"lacy-steps": 0, "lacy-steps-seed1": 1})
    assert set(gen.asked) == {"lacy-steps-seed1"}
    assert {k: v for k, v in both.items() if k.startswith("lacy-steps+")} == first
    assert set(both) == {"lacy-steps+plain/p_call/0.22", "lacy-steps-seed1+plain/p_call/0.22"}
    gen.asked.clear()
    assert thresholds_stage(cfg, models, keys, pop, gen, {"lacy-steps": 0, "lacy-steps-seed1": 1}) == both
    assert gen.asked == []


def test_a_calibration_stopped_midway_resumes_after_its_last_round(tmp_path, tiny_tokenizer):
    """results/thresholds.rounds.json keeps the rates each search measured after every round: a run stopped
    in its third round decodes only the rounds still to come and reaches the thresholds of a calibration
    that never stopped; the journal goes once the thresholds are written."""
    import json

    import torch

    from lacy.core.config import ModelConfig
    from lacy.eval.generate import LocalGenerator
    from lacy.eval.plan import thresholds_stage
    from lacy.model import build_model

    for name, seed in (("lacy-steps", 0), ("big", 1)):
        torch.manual_seed(seed)
        build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    models = {"lacy-steps": str(tmp_path / "lacy-steps")}

    class Stopping(LocalGenerator):
        stop_at, rounds = None, 0

        def generate_many(self, requests):
            self.rounds += 1
            if self.rounds == self.stop_at:
                raise RuntimeError("stopped")
            return super().generate_many(requests)

    def stage(run: str, stop_at: int | None = None) -> tuple[dict, int]:
        cfg = load_config("configs/synthbio-tiny.yaml", [
            "--run_dir", str(tmp_path / run), "--big.path", str(tmp_path / "big"), "--experiment.big_models",
            "[plain]", "--experiment.triggers", "[p_call, confidence]", "--cascade.max_new_tokens", "8",
            "--eval.calibration_rounds", "4", "--eval.calibration_tolerance", "0"])
        gen = Stopping(cfg, models)
        gen.stop_at = stop_at
        out = thresholds_stage(cfg, models, {"lacy-steps": "k1"}, population(cfg, corpus_for(cfg)), gen)
        return out, gen.rounds

    whole, rounds = stage("whole")
    assert rounds == 4 and all(t["rounds"] == 4 for t in whole.values())  # tolerance 0: every round runs
    with pytest.raises(RuntimeError, match="stopped"):
        stage("stopped", stop_at=3)
    journal = json.loads((tmp_path / "stopped" / "results" / "thresholds.rounds.json").read_text())
    assert sorted(journal["rates"]) == sorted(whole) and all(len(r) == 2 for r in journal["rates"].values())
    resumed, rounds = stage("stopped")
    assert rounds == 2 and resumed == whole
    assert not (tmp_path / "stopped" / "results" / "thresholds.rounds.json").exists()


def test_an_experiment_that_cannot_be_evaluated_stops_before_anything_trains(tmp_path, embedded_docs):
    """A corpus of files names no people: the experiment refuses at once, not after every model trained."""
    import json

    from lacy.corpus.corpora import CorpusError
    from lacy.experiment import run

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in embedded_docs[:40]))
    cfg = load_config("configs/tiny.yaml", ["--run_dir", str(tmp_path / "run"), "--data.corpus", str(corpus)])
    with pytest.raises(CorpusError, match="names no people to evaluate.*--until train"):
        run(cfg)
    assert not (tmp_path / "run" / "shards").exists() and not (tmp_path / "run" / "train").exists()


def test_the_batch_path_writes_what_each_request_alone_writes(tmp_path, tiny_tokenizer, embedded_docs):
    """Offline evaluation decodes every person of a row together (small steps as one forward pass, pending
    big calls as one batch, held until eval.big_fill of the people wait on one); a cascade decoding each
    request alone — what a Serve replica does — writes the same texts and spans, calls and decision
    points, with retrieval and with the plain big model."""
    import torch

    from lacy.cascade.big import BigSession
    from lacy.cascade.engine import Cascade
    from lacy.cascade.knowledge import build_store
    from lacy.cascade.lm import SmallLM
    from lacy.core.config import ModelConfig
    from lacy.corpus.corpora import knowledge_document
    from lacy.eval.generate import LocalGenerator, Request
    from lacy.model import build_model

    for name, seed, context in (("small", 0, 96), ("big", 1, 512)):
        torch.manual_seed(seed)
        build_model(ModelConfig(preset="tiny", seq_len=context), tiny_tokenizer).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    people = [d for d in embedded_docs if d.get("topic") == "People"][:24]
    build_store((knowledge_document(d) for d in embedded_docs), tmp_path / "knowledge.sqlite", passage_words=40)
    cfg = load_config(None, ["--run_dir", str(tmp_path), "--big.path", str(tmp_path / "big"),
                             "--cascade.max_new_tokens", "20", "--eval.batch_people", "16"])
    gen = LocalGenerator(cfg, {"small": str(tmp_path / "small")})
    requests = [Request(d["title"], "small", big, trigger, threshold, 20, topic=d["title"])
                for d in people for big, trigger, threshold in (("retrieval", "confidence", 2.0),
                                                                  ("plain", "p_call", -0.5))]
    requests += [Request(d["title"] + " was", "small", None, max_tokens=8) for d in people[:4]]  # small alone
    stats = gen.big.inner.stats
    batched = gen.generate_many(requests)
    held_batches = stats["batches"]
    gen.cfg.eval.big_fill = 0.0  # every pending call answered in the round it arrives
    assert gen.generate_many(requests) == batched
    # holding calls until 60 % of the people wait on the big model fills its batches: fewer of them
    assert gen.cfg.eval.big_fill == 0.0 and held_batches < 0.7 * (stats["batches"] - held_batches)
    model, tokenizer = gen.small["small"]
    for request, out in zip(requests, batched, strict=True):
        big = None if request.big is None else BigSession(gen.big, retrieval=request.big == "retrieval")
        alone = Cascade(SmallLM(model, tokenizer), big, cfg.cascade).generate(
            request.prompt, call_log_odds=request.threshold, trigger=request.trigger, max_new_tokens=request.max_tokens,
            allow_calls=big is not None, topic=request.topic if request.big == "retrieval" else None)
        assert (out.text, out.spans) == (alone.text, [(s.text, s.source) for s in alone.spans]), request
        assert (out.calls, out.decision_points) == (alone.calls, alone.decision_points)
    assert sum(out.calls for out in batched) > 20  # the big model wrote in many of them
    assert len({out.text for out in batched}) > 20


def test_cached_results_do_not_depend_on_where_the_run_folder_is(tmp_path):
    """A run folder copied or pulled to another path keeps its thresholds and rows: their keys hold no
    path under run_dir (the knowledge store's path once made every row of a copied run recompute)."""
    from lacy.eval.plan import _row_key

    here, there = (load_config("configs/synthbio-quick.yaml", ["--run_dir", str(tmp_path / name)])
                   for name in ("here", "there"))
    assert here.knowledge.db_path != there.knowledge.db_path
    assert _row_key(here) == _row_key(there)
    assert str(tmp_path) not in repr(_row_key(here))


def test_cached_results_do_not_depend_on_scheduling_settings():
    """Settings that change no text (when the big model's batches go, whether it re-reads a context it kept)
    key no result: a run that changes them, or a newer version that adds one, reuses its rows and thresholds."""
    from lacy.eval.plan import _row_key

    base = load_config("configs/synthbio-quick.yaml")
    scheduled = load_config("configs/synthbio-quick.yaml", ["--big.prefix_cache", "0", "--eval.big_fill", "0.3"])
    assert _row_key(scheduled) == _row_key(base)
    assert _row_key(load_config("configs/synthbio-quick.yaml", ["--big.dtype", "bfloat16"])) != _row_key(base)
