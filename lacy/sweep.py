"""The capacity sweep of the synthetic benchmark: one model size, more and more invented people.

    python -m lacy.sweep --config configs/synthbio-sweep.yaml                  # synth.people x 1/4, 1, 4
    python -m lacy.sweep --config configs/synthbio-tiny.yaml --people 30,120   # any synthbio config

For each N the whole experiment runs (`lacy.experiment`, in this process) in `<run_dir>/people-N`;
its stages are content-addressed, so a re-run reuses every point already done. Per N and rule the
sweep collects what the capacity question needs — the bits of facts the small model stores, its
loss on template tokens, the cascade's exact precision and realised call rate at the headline rate,
the small model's precision alone — and writes `<run_dir>/sweep.json`, `sweep.md` and `sweep.png`.
Where the facts fit in the model, delegation should matter less.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

from lacy.config import LacyConfig, parse_cli

log = logging.getLogger(__name__)


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def collect(cfg: LacyConfig, people: int) -> list[dict[str, Any]]:
    """One sweep point's lines, one per trained rule, from a finished experiment's files."""
    run_dir = Path(cfg.run_dir)
    with open(run_dir / "results" / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rate = cfg.experiment.headline_rate
    lines = []
    from lacy.experiment import rule_config

    # The models this config trains, in their own folders, not whatever else lies under train/.
    folders = sorted(Path(rule_config(cfg, rule, comparison, None).train.output_dir)
                     for rule in cfg.experiment.rules for comparison in cfg.experiment.comparisons)
    for folder in folders:
        model = folder.name
        bits = json.loads((folder / "stored_bits.json").read_text())
        mine = [r for r in rows if r["model"] == model and r["people"] == "train"]
        alone = next((r for r in mine if r["big"] == "none"), {})
        cascade = next((r for r in mine if r["big"] != "none" and _float(r["target_rate"]) == rate), {})
        lines.append({"people": people, "model": model, "stored_bits": bits["stored_bits"],
                      "bits_per_param": bits["bits_per_param"], "template_loss": bits["template_loss"],
                      "alone_precision": _float(alone.get("precision")),
                      "cascade_precision": _float(cascade.get("precision")),
                      "cascade_precision_lo": _float(cascade.get("precision_lo")),
                      "cascade_precision_hi": _float(cascade.get("precision_hi")),
                      "call_rate": _float(cascade.get("call_rate")),
                      "calls_on_facts": _float(cascade.get("calls_on_facts"))})
    return lines


def sweep(cfg: LacyConfig, people: list[int], backend: Any = None) -> list[dict[str, Any]]:
    """Run the experiment at each number of people and write the sweep's table and plot."""
    from lacy.experiment import run
    from lacy.report import markdown_table, precision_plot

    if cfg.data.corpus != "synthbio":
        raise ValueError(f"the capacity sweep needs data.corpus: synthbio (got {cfg.data.corpus!r})")
    if not people or min(people) < 1:
        raise ValueError(f"--people must list positive numbers of people (got {people})")
    lines: list[dict[str, Any]] = []
    for n in people:
        point = cfg.moved(Path(cfg.run_dir) / f"people-{n}")
        point.synth.people = n
        log.info("sweep point: %d people in %s", n, point.run_dir)
        run(point, backend)
        lines += collect(point, n)
    out = Path(cfg.run_dir)
    (out / "sweep.json").write_text(json.dumps(lines, indent=2))
    columns = list(lines[0]) if lines else ["people"]
    (out / "sweep.md").write_text(markdown_table(lines, columns) + "\n")
    plot_rows = [{"rule": line["model"], "people": line["people"], "precision": line["cascade_precision"] or 0.0,
                  "precision_lo": line["cascade_precision_lo"] or 0.0,
                  "precision_hi": line["cascade_precision_hi"] or 0.0}
                 for line in lines if line["cascade_precision"] is not None]  # plain has no P(<CALL>) cascade
    precision_plot(plot_rows, out / "sweep.png", x="people",
                   title="synthbio capacity sweep: cascade precision at the headline call rate")
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from lacy.console import setup_logging

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--people", help="comma-separated numbers of invented people (default: sweep of the "
                                        "config's synth.people x 1/4, 1, 4)")
    known, rest = extra.parse_known_args(argv)
    setup_logging()
    cfg = parse_cli(rest, __doc__ or "")
    people = ([int(p) for p in known.people.split(",")] if known.people
              else [max(1, cfg.synth.people // 4), cfg.synth.people, cfg.synth.people * 4])
    lines = sweep(cfg, people)
    print((Path(cfg.run_dir) / "sweep.md").read_text())  # noqa: T201 - the sweep's product
    return lines


if __name__ == "__main__":
    main()
