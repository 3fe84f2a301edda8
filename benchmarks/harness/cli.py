"""Command-line pieces every runner shares.

    `positive_int`, `non_negative_int`, `positive_float`   argparse `type=`s that name the bad value
    `run_suite(doc, default, subcommands)`                  the subcommand dispatch of a suite's `__main__`
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _number(kind, minimum, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, 0, True, "an integer >= 1")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")


def run_suite(doc: str, default: str | None, subcommands: dict[str, str], argv=None):
    """The `__main__` of a suite: `python -m benchmarks.<suite> [SUBCOMMAND] [ARGS]`.

    `subcommands` maps a name to the module whose `main(argv)` runs it; without a subcommand the `default` module
    runs (None: a subcommand is required). `--help` prints the suite's `doc`, then the default runner's options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in subcommands:
        return importlib.import_module(subcommands[argv[0]]).main(argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(doc.strip() + "\n", flush=True)
        if default is None:
            return 0
        print(f"Without a subcommand it runs {default}:\n", flush=True)
        return importlib.import_module(default).main(["--help"])
    if default is None:
        what = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand given"
        raise SystemExit(f"{what}: choose one of {', '.join(subcommands)} (--help says what each does)")
    return importlib.import_module(default).main(argv)
