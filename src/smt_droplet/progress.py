"""Progress bars for long work in a terminal (``tqdm``, Debian's ``python3-tqdm``).

A bar is shown only when stderr is a terminal, the process does not run under systemd (no
``INVOCATION_ID``/``JOURNAL_STREAM``), ``SMT_NO_PROGRESS`` is unset and ``tqdm`` can be
imported; otherwise :func:`bar` yields a :class:`NullBar` and the journal keeps its one line per
file. While a bar is shown, log lines are printed above it (``logging_redirect_tqdm``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any


class NullBar:
    """What :func:`bar` yields when no bar is shown: every call does nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


def wanted() -> bool:
    if os.environ.get("SMT_NO_PROGRESS") or "INVOCATION_ID" in os.environ:
        return False
    if "JOURNAL_STREAM" in os.environ:
        return False
    return sys.stderr.isatty()


@contextlib.contextmanager
def bar(total: float, unit: str, desc: str) -> Iterator[Any]:
    """A tqdm bar over ``total`` ``unit``s (bytes: scaled, with rate and ETA), or a NullBar."""
    if not wanted() or total <= 0:
        yield NullBar()
        return
    try:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        yield NullBar()
        return
    scaled = unit == "B"
    size = shutil.get_terminal_size()
    with (
        logging_redirect_tqdm(),
        tqdm(
            total=total,
            unit=unit,
            unit_scale=scaled,
            unit_divisor=1024 if scaled else 1000,
            desc=desc,
            file=sys.stderr,
            # a terminal that reports 0x0 (a fresh pty) would otherwise hide the bar
            ncols=size.columns,
            nrows=size.lines,
            leave=False,
        ) as shown,
    ):
        yield shown
