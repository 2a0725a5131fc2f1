"""Sweeps of the synthetic benchmark: more and more invented people (capacity), or more and more
harmless uncertainty (the dial).

    python -m lacy.sweep --config configs/synthbio-sweep.yaml                  # synth.people x 1/4, 1, 4
    python -m lacy.sweep --config configs/synthbio-tiny.yaml --people 30,120   # any synthbio config
    python -m jobs.sweep --config configs/synthbio-sweep.yaml --people 40,100,1000  # the same on Ray
    python -m lacy.sweep --config configs/synthbio-dial.yaml --filler 0,3,6    # the dial (jobs.sweep: on Ray)

The dial (`--filler`): per point, `synth.filler` filler sentences per biography — words as uncertain as
facts but harmless — and the whole comparison protocol (`<run_dir>/filler-N`); `dial.json`, `dial.md`
and `dial.png` give each system's correct values per person at every call rate and its APGR along the
dial, and LaCy's paired differences (P(<CALL>) against inference-only calling, loss-only and its own
confidence) at each point and rate; `--publish` copies them to docs/results: where training-time delegation
helps, it should be where confidence spends its budget on harmless uncertainty.

For each N the whole experiment runs (`lacy.experiment`, in this process) in `<run_dir>/people-N`;
its stages are content-addressed, so a re-run reuses every point already done. Per N, rule and trigger
the sweep collects what the capacity question needs — the bits of facts the small model stores, its loss
on template tokens, the cascade's correct values per person, precision and realised call rate at the
headline rate, the small model's correct values alone — and writes `<run_dir>/sweep.json`, `sweep.md` and
`sweep.png` (correct values, call rate and stored bits against N, a line per model and trigger). Where the
facts fit in the model, delegation should matter less. A point with fewer trained-on people than eval.entities +
eval.calibration_entities splits those it has in the same proportion (the table's `eval_people`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lacy.core.config import LacyConfig, parse_cli
from lacy.core.console import setup_logging
from lacy.core.provenance import git_describe, machine
from lacy.experiment import rule_config, run
from lacy.report import markdown_table

log = logging.getLogger(__name__)


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def collect(cfg: LacyConfig, people: int) -> list[dict[str, Any]]:
    """One sweep point's lines from a finished experiment's files: one per trained model and trigger at the
    headline rate (a model with no cascade row, one line with its numbers alone). Quality is correct values
    per person, as in the comparison protocol; precision beside it."""
    run_dir = Path(cfg.run_dir)
    with open(run_dir / "results" / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rate = cfg.experiment.headline_rate
    lines = []

    # The models this config trains, in their own folders, not whatever else lies under train/.
    folders = sorted(Path(rule_config(cfg, rule, comparison, None).train.output_dir)
                     for rule in cfg.experiment.rules for comparison in cfg.experiment.comparisons)
    for folder in folders:
        model = folder.name
        bits = json.loads((folder / "stored_bits.json").read_text())
        mine = [r for r in rows if r["model"] == model and r["people"] == "train"]
        alone = next((r for r in mine if r["big"] == "none"), {})
        cascades = [r for r in mine if r["big"] != "none" and _float(r["target_rate"]) == rate] or [{}]
        for cascade in cascades:
            lines.append({"people": people, "model": model, "trigger": cascade.get("trigger") or None,
                          "eval_people": cfg.eval.entities, "stored_bits": bits["stored_bits"],
                          "bits_per_param": bits["bits_per_param"], "template_loss": bits["template_loss"],
                          "alone_correct": _float(alone.get("supported_per_person")),
                          "correct": _float(cascade.get("supported_per_person")),
                          "correct_lo": _float(cascade.get("supported_per_person_lo")),
                          "correct_hi": _float(cascade.get("supported_per_person_hi")),
                          "precision": _float(cascade.get("precision")),
                          "call_rate": _float(cascade.get("call_rate")),
                          "calls_on_facts": _float(cascade.get("calls_on_facts"))})
    return lines


def sweep(cfg: LacyConfig, people: list[int], backend: Any = None, track: bool = False,
          publish: str | Path | None = None, command: str = "") -> list[dict[str, Any]]:
    """Run the experiment at each number of people and write the sweep's table and plot (copied with the
    command, commit and machine to `<publish>/<run name>.md` when `publish` names a folder)."""
    started = time.time()
    if cfg.data.corpus != "synthbio":
        raise ValueError(f"the capacity sweep needs data.corpus: synthbio (got {cfg.data.corpus!r})")
    if not people or min(people) < 1:
        raise ValueError(f"--people must list positive numbers of people (got {people})")
    points = []
    for n in people:  # every point's groups checked before the first one runs
        point = cfg.moved(Path(cfg.run_dir) / f"people-{n}")
        point.synth.people = n
        _fit_groups(point)
        points.append(point)
    lines: list[dict[str, Any]] = []
    for n, point in zip(people, points, strict=True):
        log.info("sweep point: %d people in %s", n, point.run_dir)
        run(point, backend, track=track)
        lines += collect(point, n)
    out = Path(cfg.run_dir)
    (out / "sweep.json").write_text(json.dumps(lines, indent=2))
    columns = list(lines[0]) if lines else ["people"]
    (out / "sweep.md").write_text(markdown_table(lines, columns) + "\n")
    sweep_plot(lines, out / "sweep.png", cfg.experiment.headline_rate)
    if publish is not None:
        _publish(out, "sweep", Path(publish), "the capacity sweep", command, started,
                 f"Each point is the comparison protocol (one training seed, the headline rate "
                 f"{cfg.experiment.headline_rate:g}) on a corpus of that many invented people; its own report is "
                 "`<run_dir>/people-N/results/report.md`. `correct`: correct values per person (abstainers 0), "
                 "`correct_lo` / `correct_hi` its 95 % interval over people; precision beside it:")
    return lines


def _publish(out: Path, stem: str, publish: Path, title: str, command: str, started: float, intro: str) -> None:
    """A sweep's page in `publish`: `<stem>.md` and `<stem>.png` of `out` under the command, commit and machine."""
    name, host = out.name, machine()
    publish.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / f"{stem}.png", publish / f"{name}.png")
    (publish / f"{name}.md").write_text("\n".join([
        f"# {name}: {title}", "",
        f"Produced by `{command}` at commit `{git_describe()}` on {time.strftime('%Y-%m-%d')}, {host['cpu']} "
        f"({host['cores']} cores, load {host['load']:.2f} at the end, {(time.time() - started) / 60:.1f} min). "
        + intro, "", (out / f"{stem}.md").read_text(), f"![{title}]({name}.png)", ""]))


def _fit_groups(point: LacyConfig) -> None:
    """Evaluation and calibration people of a small point: its trained-on people (≈ people x (1 -
    val_fraction)) split in the config's proportion when they are fewer than both groups need."""
    e = point.eval
    trained = int(point.synth.people * (1 - point.data.val_fraction))
    if trained < 5:
        raise ValueError(f"a sweep point of {point.synth.people} people has ≈{trained} trained-on people: too "
                         "few to split into evaluation and calibration people (--people needs larger numbers)")
    if e.entities + e.calibration_entities > trained:
        calibration = max(1, trained * e.calibration_entities // (e.entities + e.calibration_entities))
        log.info("%d people: %d trained-on people for %d evaluation + %d calibration; using %d + %d",
                 point.synth.people, trained, e.entities, e.calibration_entities, trained - calibration - 2,
                 calibration)
        # Two spare: the split is by a hash of the person, so "trained" is only about right.
        e.entities, e.calibration_entities = trained - calibration - 2, calibration


def sweep_plot(lines: list[dict[str, Any]], path: Path, rate: float) -> Path:
    """Three panels against the number of people: correct values per person (each model's cascade per
    trigger at the headline rate with its CI, solid; the small model alone, dashed), the cascades' realised
    call rates, and the fact bits each small model stores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for i, model in enumerate(dict.fromkeys(line["model"] for line in lines)):
        mine = sorted((line for line in lines if line["model"] == model), key=lambda line: line["people"])
        color, styles = f"C{i}", iter(("o", "s", "^", "D"))
        for trigger in dict.fromkeys(line["trigger"] for line in mine if line["correct"] is not None):
            pts = [p for p in mine if p["trigger"] == trigger]
            ys, xs, marker = [p["correct"] for p in pts], [p["people"] for p in pts], next(styles)
            err = [[y - p["correct_lo"] for y, p in zip(ys, pts, strict=True)],
                   [p["correct_hi"] - y for y, p in zip(ys, pts, strict=True)]]
            axes[0].errorbar(xs, ys, yerr=err, marker=marker, capsize=3, color=color, label=f"{model} + {trigger}")
            axes[1].plot(xs, [p["call_rate"] for p in pts], marker=marker, color=color, label=f"{model} + {trigger}")
        per_people = {p["people"]: p for p in mine}  # a model's alone and bits are the same for every trigger
        xs = sorted(per_people)
        axes[0].plot(xs, [per_people[x]["alone_correct"] or 0.0 for x in xs], ls="--", marker=".", color=color,
                     label=f"{model} alone")
        axes[2].plot(xs, [per_people[x]["stored_bits"] for x in xs], marker="o", color=color, label=model)
    axes[1].axhline(rate, color="grey", lw=0.8, ls=":")
    for ax, ylabel in zip(axes, ("correct values per person", f"realised call rate (target {rate:.2f})",
                                 "fact bits stored in the small model"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("invented people in the corpus")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("synthbio capacity sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dial(cfg: LacyConfig, fillers: list[int], backend: Any = None, track: bool = False,
         publish: str | Path | None = None, command: str = "") -> list[dict[str, Any]]:
    """The comparison protocol at each number of filler sentences per biography; the dial's table and plot
    (copied with the command, commit and machine to `<publish>/<run name>.md` when `publish` names a folder)."""
    started = time.time()
    if cfg.data.corpus != "synthbio":
        raise ValueError(f"the dial needs data.corpus: synthbio (got {cfg.data.corpus!r})")
    if not fillers or min(fillers) < 0:
        raise ValueError(f"--filler must list numbers of filler sentences, 0 or more (got {fillers})")
    lines: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    for n in fillers:
        point = cfg.moved(Path(cfg.run_dir) / f"filler-{n}")
        point.synth.filler = n
        log.info("dial point: %d filler sentences per biography in %s", n, point.run_dir)
        results = run(point, backend, track=track)
        systems, pairs = dial_point(n, json.loads((results / "comparison.json").read_text()),
                                    cfg.experiment.headline_rate)
        lines += systems
        paired += pairs
    out = Path(cfg.run_dir)
    (out / "dial.json").write_text(json.dumps({"systems": lines, "paired": paired}, indent=2))
    rates = dict.fromkeys(k for line in lines for k in line if k.startswith("correct @"))
    columns = ["filler", "system", *rates, "call_rate", "apgr"]
    (out / "dial.md").write_text(markdown_table(lines, columns) + "\n\n" + markdown_table(
        paired, ["filler", "pair", "rate", "difference [CI]"]) + "\n")
    dial_plot(lines, out / "dial.png", cfg.experiment.headline_rate)
    if publish is not None:
        _publish(out, "dial", Path(publish), "the dial of acceptable uncertainty", command, started,
                 "Each point is the whole comparison protocol on a corpus with that many filler sentences per "
                 "biography; its own report is `<run_dir>/filler-N/results/report.md`.\n\nCorrect values per "
                 "person (abstainers 0) at each call rate, 95 % intervals over seeds and people:")
    return lines


def dial_point(filler: int, comparison: dict[str, Any], rate: float) -> tuple[list[dict], list[dict]]:
    """One dial point's lines from its comparison.json: per system its correct values per person at every
    rate (the headline rate's also as numbers, for the plot), call rate and APGR; the big model alone; and
    LaCy's paired differences at every rate."""
    def ci(q: list[float] | None) -> str | None:
        return None if q is None else f"{q[0]:.3f} [{q[1]:.3f}, {q[2]:.3f}]"

    lines = []
    for system in comparison["systems"]:
        quality = system["quality"].get(str(rate))
        line = {"filler": filler, "system": system["system"], "quality": quality and quality[0],
                "quality_lo": quality and quality[1], "quality_hi": quality and quality[2]}
        line.update({f"correct @{r:g}": ci(system["quality"].get(str(r))) for r in comparison["rates"]})
        line.update({"call_rate": system["call_rate"].get(str(rate)), "apgr": system["apgr"][0],
                     "apgr_lo": system["apgr"][1], "apgr_hi": system["apgr"][2]})
        lines.append(line)
    lines += [{"filler": filler, "system": f"big alone ({big})", "quality": q[0], f"correct @{rate:g}": ci(q)}
              for big, q in comparison["big_alone"].items()]
    paired = [{"filler": filler, "pair": p["pair"] + (f" ({p['unit']})" if p["unit"] else ""), "rate": p["rate"],
               "difference [CI]": "{:+.3f} [{:+.3f}, {:+.3f}]".format(*p["difference"])}
              for p in comparison.get("paired", [])]
    return lines, paired


def dial_plot(lines: list[dict[str, Any]], path: Path, rate: float) -> Path:
    """Correct values per person at the headline rate (with intervals) and APGR against the dial, one
    line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, system in enumerate(dict.fromkeys(line["system"] for line in lines)):
        pts = sorted((x for x in lines if x["system"] == system and x["quality"] is not None),
                     key=lambda x: x["filler"])
        xs, ys = [p["filler"] for p in pts], [p["quality"] for p in pts]
        if "quality_lo" in pts[0]:
            err = [[y - p["quality_lo"] for y, p in zip(ys, pts, strict=True)],
                   [p["quality_hi"] - y for y, p in zip(ys, pts, strict=True)]]
            axes[0].errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=system)
            axes[1].plot(xs, [p["apgr"] for p in pts], marker="o", color=f"C{i}", label=system)
        else:
            axes[0].plot(xs, ys, ls="--", color="gray", label=system)
    for ax, ylabel in zip(axes, (f"correct values per person at {rate:.0%} calls", "APGR"), strict=True):
        ax.set_xlabel("filler sentences per biography (harmless uncertainty)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("synthbio: the dial of acceptable uncertainty")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None, backend: Any = None) -> list[dict[str, Any]]:
    """The sweep from the command line; `backend` as `lacy.experiment.run` takes it (None: this process)."""

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--people", help="comma-separated numbers of invented people (default: sweep of the "
                                        "config's synth.people x 1/4, 1, 4)")
    extra.add_argument("--filler", help="comma-separated numbers of filler sentences per biography: the dial")
    extra.add_argument("--publish", help="also write the sweep's page to this folder (docs/results)")
    known, rest = extra.parse_known_args(argv)
    setup_logging()
    cfg = parse_cli(rest, __doc__ or "")
    module = "lacy.sweep" if backend is None else "jobs.sweep"
    command = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
    if known.filler:
        lines = dial(cfg, [int(n) for n in known.filler.split(",")], backend, track=True, publish=known.publish,
                     command=command)
        print((Path(cfg.run_dir) / "dial.md").read_text())  # noqa: T201 - the sweep's product
        return lines
    people = ([int(p) for p in known.people.split(",")] if known.people
              else [max(1, cfg.synth.people // 4), cfg.synth.people, cfg.synth.people * 4])
    lines = sweep(cfg, people, backend, track=True, publish=known.publish, command=command)
    print((Path(cfg.run_dir) / "sweep.md").read_text())  # noqa: T201 - the sweep's product
    return lines


if __name__ == "__main__":
    main()
