"""`lacy`: one command for every stage, in this process or on Ray (`--ray`).

    lacy score      --config configs/tiny.yaml [--ray]       # corpus -> shards (lacy.shards.scoring | jobs.score)
    lacy train      --config configs/tiny.yaml [--ray]       # one rule (lacy.train | jobs.pretrain)
    lacy experiment --config configs/tiny.yaml [--ray]       # the pipeline (lacy.experiment | jobs.experiment)
    lacy calibrate  --config configs/synthbio-quick.yaml --small DIR --rate 0.22    # lacy.calibrate
    lacy serve      --config configs/tiny.yaml               # the cascade behind Ray Serve (services.cascade)
    lacy sweep      --config configs/synthbio-sweep.yaml [--ray] --people 40,100   # lacy.sweep | jobs.sweep
    lacy train --help                                         # that stage's config fields alone

Each subcommand is the `main` of the module it names, given the rest of the command line, so
`python -m <module>` stays the same command. This file sits in `jobs/` because it dispatches to the Ray
shells (`jobs.*`, `services.*`), which the library must not import; a stage's module is imported only when
it runs, so `lacy train` never imports Ray.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "score": ("lacy.shards.scoring", "jobs.score", "corpus -> tokenizer -> fact-tagged shards"),
    "train": ("lacy.train", "jobs.pretrain", "pretrain one rule from the shards"),
    "experiment": ("lacy.experiment", "jobs.experiment", "every stage: shards, rules, calibration, evaluation, report"),
    "calibrate": ("lacy.calibrate", None, "the threshold of a small model at a target call rate, calls on"),
    "serve": ("services.cascade", "services.cascade", "the cascade behind Ray Serve's OpenAI-compatible API"),
    "sweep": ("lacy.sweep", "jobs.sweep", "the experiment over more and more people, or the filler dial"),
}
"""Subcommand -> (module in this process, module on Ray or None, what it does). `serve` is Ray Serve either way."""


def usage() -> str:
    lines = ["usage: lacy COMMAND [--ray] --config FILE [--section.field value ...]", "", "commands:"]
    for name, (local, ray, what) in COMMANDS.items():
        where = local if ray in (None, local) else f"{local}; --ray: {ray}"
        lines.append(f"  {name:<11} {what} ({where})")
    lines += ["", "`lacy COMMAND --help` lists that command's options and config fields."]
    return "\n".join(lines)


def module_of(command: str, on_ray: bool) -> str:
    """The module whose `main` runs `lacy COMMAND [--ray]`; SystemExit naming the problem otherwise."""
    if command not in COMMANDS:
        raise SystemExit(f"lacy: unknown command {command!r}\n\n{usage()}")
    local, ray, _ = COMMANDS[command]
    if on_ray and ray is None:
        raise SystemExit(f"lacy {command}: there is no Ray version; run it without --ray (it runs in this process)")
    return ray if on_ray else local


def main(argv: list[str] | None = None) -> None:
    """The `lacy` console script (its exit status is 0 unless a stage raises)."""
    run(argv)


def run(argv: list[str] | None = None) -> Any:
    """`lacy COMMAND [--ray] ARGS...`: the command's module's `main(ARGS)`, and what it returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())  # noqa: T201 - the command's help
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    on_ray = "--ray" in rest
    module = module_of(command, on_ray)
    rest = [a for a in rest if a != "--ray"]
    if "-h" in rest or "--help" in rest:
        ray = COMMANDS[command][1]
        print(f"usage: lacy {command}{' [--ray]' if ray not in (None, COMMANDS[command][0]) else ''} "  # noqa: T201
              f"--config FILE [--section.field value ...]   (python -m {module})\n")
    return importlib.import_module(module).main(rest)


if __name__ == "__main__":
    main()
