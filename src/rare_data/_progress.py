"""Progress bars for the package's long loops (indexing, encoding a corpus, evaluation)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_enabled() -> bool:
    """Progress bars are shown on a terminal and kept out of logs (stderr redirected to a file)."""
    return sys.stderr.isatty()


def progress(iterable: Iterable[Any], desc: str, total: int | None = None, disable: bool | None = None):
    """``tqdm`` progress over a long loop; off when stderr is not a terminal (logs stay clean) unless forced."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = not progress_enabled()
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True)
