"""Calibrate a cascade: the fixed threshold at which a small model calls at a target rate, with calls on.

The same closed-loop calibration the experiment runs (`lacy.eval.plan.calibrate_thresholds`): the
open-loop quantile of the trigger's log-odds at the decision points, then rounds that decode the
config's calibration people with the big model answering the calls, moving the threshold until the
realised rate is within eval.calibration_tolerance of the target (a model whose calls beget calls
would otherwise realise several times the target). Any corpus with people (embedded, wiki2015,
synthbio); the people are the config's calibration group, never its evaluation people.

    python -m lacy.calibrate --config configs/synthbio-quick.yaml --small runs/synthbio-quick/train/lacy-steps/final \\
        --rate 0.22 --trigger p_call --big retrieval

Prints and writes JSON {log_odds, threshold, rate, realised_rate, rounds, trigger, big, people, small,
config_hash} to `--out` (default `<run_dir>/calibration.json`), the resolved config beside it: deploy
with `cascade.call_log_odds` (or send `call_log_odds`); `threshold` is the same as a probability,
which rounds to 1.0 past log-odds ≈ 37.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lacy.cascade.policy import probability
from lacy.core.config import BIG_MODELS, TRIGGERS, LacyConfig, config_hash, parse_cli, save_config
from lacy.core.console import setup_logging
from lacy.core.tracking import active, log_metrics, start_run
from lacy.corpus.corpora import corpus_for
from lacy.eval.generate import LocalGenerator
from lacy.eval.plan import calibrate_thresholds, population, threshold_key

log = logging.getLogger(__name__)

OPTIONS = """
Calibration options:
  --small PATH         small-model directory (safetensors + tokenizer) [required]
  --rate R             target call rate (default cascade.call_rate)
  --trigger T          p_call or confidence (default cascade.trigger)
  --big B              plain or retrieval: the big side that answers the calls (default: retrieval when
                       big.retrieval is on, else plain)
  --out FILE           where the JSON goes (default <run_dir>/calibration.json)
"""


def calibrate_model(cfg: LacyConfig, small: str, rate: float, trigger: str, big: str) -> dict:
    """The calibrated threshold of one small model, trigger, big side and rate, on the config's
    calibration people (the same numbers the experiment calibrates)."""
    cfg.eval.call_rates = [rate]
    cfg.experiment.big_models = [big]
    pop = population(cfg, corpus_for(cfg))
    generator = LocalGenerator(cfg, {"small": small})
    result = calibrate_thresholds(cfg, {"small": small}, pop.calibration, generator,
                                  triggers={"small": [trigger]})[threshold_key("small", big, trigger, rate)]
    return {"log_odds": result["threshold"], "threshold": probability(result["threshold"]), "rate": rate,
            "realised_rate": result["realised_rate"], "rounds": result["rounds"], "trigger": trigger, "big": big,
            "people": len(pop.calibration), "small": str(Path(small).resolve()), "config_hash": config_hash(cfg)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--small", "--out", "--trigger", "--big"):
        parser.add_argument(flag)
    parser.add_argument("--rate", type=float)
    args, rest = parser.parse_known_args(argv)
    setup_logging()
    cfg = parse_cli(rest, description=(__doc__ or "") + OPTIONS, stage="calibrate")
    if not args.small:
        raise SystemExit("--small PATH is required (the small model's directory)")
    rate = cfg.cascade.call_rate if args.rate is None else args.rate
    if rate is None or not 0.0 < rate <= 1.0:
        raise SystemExit(f"--rate must be in (0, 1], got {rate}")
    trigger = args.trigger or cfg.cascade.trigger
    big = args.big or ("retrieval" if cfg.big.retrieval else "plain")
    if trigger not in TRIGGERS or big not in BIG_MODELS:
        raise SystemExit(f"--trigger must be one of {TRIGGERS} and --big one of {BIG_MODELS}")
    with start_run(cfg, "calibrate"):  # one MLflow run: the answer as metrics, the question as tags
        result = calibrate_model(cfg, args.small, rate, trigger, big)
        log_metrics({k: result[k] for k in ("log_odds", "threshold", "rate", "realised_rate", "rounds", "people")
                     if isinstance(result[k], int | float)})
        if (mlflow := active()) is not None:
            mlflow.set_tags({"lacy.small": result["small"], "lacy.trigger": trigger, "lacy.big": big})
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "calibration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    save_config(cfg, out.with_name(out.stem + ".config.yaml"))
    print(json.dumps(result))  # noqa: T201 - the command's product
    return result


if __name__ == "__main__":
    main()
