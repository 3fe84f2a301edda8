"""The `__main__` of every suite: `python -m benchmarks.<suite> [SUBCOMMAND] [ARGS]`."""

from __future__ import annotations

import importlib
import sys


def run_suite(doc: str, default: str | None, subcommands: dict[str, str], argv=None):
    """The `__main__` of a suite: `python -m benchmarks.<suite> [SUBCOMMAND] [ARGS]`.

    `subcommands` maps a name to the module whose `main(argv)` runs it; without a subcommand the `default` module
    runs (None: a subcommand is required). `--help` prints the suite's `doc`, then the default runner's options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    suite = (default or next(iter(subcommands.values()))).rpartition(".")[0]
    if argv and argv[0] in subcommands:
        sys.argv[0] = f"python -m {suite} {argv[0]}"  # argparse's usage line names the command as typed
        return importlib.import_module(subcommands[argv[0]]).main(argv[1:])
    sys.argv[0] = f"python -m {suite}"
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
