"""Progress bars on stderr with an estimate of the time left (tqdm), off when not wanted."""

from __future__ import annotations

from collections.abc import Iterable


def bar(it: Iterable, *, desc: str = "", total: int | None = None, enabled: bool = True):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
