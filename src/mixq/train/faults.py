"""Fault injection at the run folder's write boundaries, for the crash tests.

``MIXQ_FAULT=after:NAME[@N][:exit]`` stops the process right after the N-th (default: first)
time the trainer passes boundary ``NAME`` (``step``, ``best.pt``, ``last.pt``, ``metrics``,
``report``, ``summary``): by raising :class:`InjectedFault` (a ``BaseException``, so no
``except Exception`` handler of the trainer swallows it), or with ``:exit`` by
``os._exit(FAULT_EXIT)``, a kill that runs no cleanup at all. Unset (always, outside tests):
:func:`boundary` only counts.
"""

from __future__ import annotations

import os
from collections import Counter

ENV = "MIXQ_FAULT"
FAULT_EXIT = 86
_seen: Counter[str] = Counter()


class InjectedFault(BaseException):
    """Raised at the boundary named by ``MIXQ_FAULT`` (tests only)."""


def reset() -> None:
    """Forget the boundaries passed so far (each run counts from zero)."""
    _seen.clear()


def boundary(name: str) -> None:
    """Mark that the trainer has just finished write/step ``name``; fault here if asked."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _seen[name] += 1
    where, _, how = spec.removeprefix("after:").partition(":")
    target, _, nth = where.partition("@")
    if target != name or _seen[name] != int(nth or 1):
        return
    if how == "exit":
        os._exit(FAULT_EXIT)
    raise InjectedFault(f"injected fault after {name} #{_seen[name]}")
