"""Build and load lmpress's C++ extensions so that an interrupted build never blocks a later run.

``torch.utils.cpp_extension.load`` alone has two failure modes this module removes:

* it guards a build with a file named ``lock`` in the build folder and waits, silently and forever,
  as long as that file exists (``torch/utils/file_baton.py``); a build killed mid-way (SIGTERM, a
  kill of the job, an out-of-memory kill) leaves the file behind, and every later run hangs;
* it builds under the bare extension name in one shared folder, so two lmpress installs with
  different sources rebuild (and load) each other's kernel.

:func:`load_extension` therefore builds in a private folder per source content,
``<root>/<name>_<digest>`` (``digest``: the sources' bytes and the headers beside them, the compile and link flags, the torch
and Python versions), with ``root`` = ``$TORCH_EXTENSIONS_DIR`` if set, else
``$LMPRESS_CACHE/ext`` (default ``~/.cache/lmpress/ext``). Builders of one folder take an
``fcntl.flock`` on ``<folder>.lock`` first: the kernel drops that lock when its owner dies, and a
process waiting for a live one says so on stderr. Holding it, any torch ``lock`` file in the
folder is a leftover of a killed run and is removed, and a folder without the completion marker
(an interrupted build: its objects may be half written) is emptied and built again.

Example::

    ext = load_extension("lmpress_qgemv", [csrc / "qgemv.cpp"], ["-O3"], ["-fopenmp"])
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

COMPLETE = "lmpress-complete"  # written into a build folder once its module has loaded


def load_extension(name: str, sources: list[Path], cflags: list[str], ldflags: list[str]):
    """The extension module built from ``sources`` (compiled on the first call for this content,
    then loaded from the cache). Raises what the compiler or the loader raised."""
    import fcntl

    from torch.utils.cpp_extension import load

    folder = build_folder(name, sources, cflags, ldflags)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a+") as lock:  # closing it drops the flock
        _acquire(fcntl, lock, name)
        _clear_leftovers(folder, name)
        folder.mkdir(exist_ok=True)
        module = load(name=folder.name, sources=[str(s) for s in sources], extra_cflags=cflags,
                      extra_ldflags=ldflags, build_directory=str(folder), verbose=False)
        (folder / COMPLETE).touch()
    return module


def build_folder(name: str, sources: list[Path], cflags: list[str], ldflags: list[str]) -> Path:
    """``<cache_root()>/<name>_<12 hex digits>``: one folder (and module name) per build input."""
    import torch

    h = hashlib.sha256()
    for part in (torch.__version__, sys.implementation.cache_tag, *cflags, "|", *ldflags, "|"):
        h.update(part.encode() + b"\0")
    headers = sorted({hd for src in sources for hd in Path(src).parent.glob("*.h")})  # what the sources include
    for src in [*sources, *headers]:
        h.update(Path(src).name.encode() + b"\0" + Path(src).read_bytes() + b"\0")
    return cache_root() / f"{name}_{h.hexdigest()[:12]}"


def cache_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` if set, else ``$LMPRESS_CACHE/ext`` (default ``~/.cache/lmpress/ext``)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser()
    return Path(os.environ.get("LMPRESS_CACHE", Path.home() / ".cache" / "lmpress")).expanduser() / "ext"


def _acquire(fcntl, lock, name: str) -> None:
    """Take the exclusive flock, saying whom we wait for when a live process holds it; then
    write our pid into the file for the next waiter."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        print(f"lmpress: waiting for another lmpress process building {name} (pid {pid})...",
              file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()


def _clear_leftovers(folder: Path, name: str) -> None:
    """With the flock held nobody else builds in ``folder``: remove what a killed run left there."""
    if (folder / COMPLETE).exists():
        if (folder / "lock").exists():
            print(f"lmpress: removed a stale build lock of {name} left by an interrupted run",
                  file=sys.stderr, flush=True)
            (folder / "lock").unlink()
        return
    if folder.exists() and any(folder.iterdir()):
        print(f"lmpress: an earlier build of {name} was interrupted; building it again",
              file=sys.stderr, flush=True)
        shutil.rmtree(folder)
    print(f"lmpress: compiling the {name} C++ kernel (first use only)...", file=sys.stderr, flush=True)
