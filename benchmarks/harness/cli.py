"""Command-line pieces every runner shares: `positive_int`, `non_negative_int`, `positive_float`, argparse `type=`s
that name the bad value. (A suite's `__main__` dispatch is `benchmarks.harness.suite`, which no runner imports, so
editing it leaves every stored run current.)
"""

from __future__ import annotations

import argparse


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
