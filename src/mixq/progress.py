"""Progress bars that suit their place: a tqdm bar on a terminal, nothing in a file or pipe.

A log of a long run is then one line per epoch (the trainer prints it either way), not
thousands of carriage-return bar updates.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["progress_bar"]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, stream: TextIO | None = None) -> Any:
    """A tqdm bar of ``total`` steps on ``stream`` (default stderr) when it is a terminal and
    tqdm is installed; else an object with the same ``update``/``close`` that does nothing."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not getattr(stream, "isatty", lambda: False)():
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=stream)
