"""Fault rows that need a real process or a really full disk (marker ``faults``; CI runs them in its
second step, the default run leaves them out).

* **Signals**: SIGTERM, SIGINT (and SIGKILL) delivered to a real ``lmpress compress`` process while it
  works (a method applied, nothing saved yet) and while it saves (the folder written under its
  temporary name, not yet renamed). The process is held at that point by a launcher that wraps
  ``lmpress.recipe.apply`` or ``lmpress.io._write`` to touch a marker file and sleep after the real
  call, so the signal lands there every time; everything else is the real command.
* **A full disk**: a 2 MiB tmpfs (mounting needs root; skipped with the reason where it is not
  allowed), filled with one filler file, under each thing lmpress writes: the compressed folder, the
  ``--json`` report of ``compress`` and of ``eval``, a distillation checkpoint, the top-k cache.

Every row checks: the exit code, the one-line message, no traceback, nothing at the output path or
beside it (no temporary file or folder, no empty report), the input tree unchanged, and that the same
command succeeds once the cause is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_faults import _tree, tiny_inputs  # noqa: F401  (a fixture)

pytestmark = pytest.mark.faults

RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32"]

LAUNCHER = """
import os, sys, time
import lmpress.io, lmpress.recipe

def stall(fn):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        open(os.environ["STALL_MARKER"], "w").close()
        time.sleep(60)
        return out
    return wrapped

if os.environ["STALL_AT"] == "save":
    lmpress.io._write = stall(lmpress.io._write)  # the files are written, the folder not yet renamed
else:
    lmpress.recipe.apply = stall(lmpress.recipe.apply)  # the method has run, nothing is saved

from lmpress.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _work(tiny_inputs, tmp_path) -> tuple[Path, list[str]]:
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_inputs / "model", work / "m")
    args = ["compress", str(work / "m"), "--data", str(tiny_inputs / "corpus.txt"), "--no-eval", *RTN,
            "-o", str(work / "out")]
    return work, args


def _main(argv) -> tuple[int, str]:
    """``lmpress.cli.main(argv)`` in this process; a raised exception is a traceback."""
    from lmpress.cli import main

    try:
        return main([str(a) for a in argv]), ""
    except Exception as e:
        pytest.fail(f"traceback: {type(e).__name__}: {str(e)[:300]}")


@pytest.mark.parametrize("sig,at,rc", [
    (signal.SIGTERM, "save", 128 + signal.SIGTERM), (signal.SIGINT, "save", 128 + signal.SIGINT),
    (signal.SIGTERM, "work", 128 + signal.SIGTERM), (signal.SIGINT, "work", 128 + signal.SIGINT),
])
def test_signal_leaves_nothing_and_the_next_run_succeeds(sig, at, rc, tiny_inputs, tmp_path):
    work, args = _work(tiny_inputs, tmp_path)
    before = _tree(work)
    proc, err = _signalled(args, at, sig, tmp_path)
    assert proc.returncode == rc, err
    assert f"lmpress: interrupted ({sig.name})" in err and "Traceback" not in err, err
    assert _tree(work) == before, "an interrupted run left something in the work folder"
    assert _main(args)[0] == 0 and (work / "out" / "config.json").exists()
    assert sorted(p.name for p in work.iterdir()) == ["m", "out"]


def test_sigkill_during_the_save_is_cleaned_up_by_the_next_run(tiny_inputs, tmp_path):
    """SIGKILL cannot be caught: the temporary folder stays, and the next save to that path removes it."""
    work, args = _work(tiny_inputs, tmp_path)
    proc, err = _signalled(args, "save", signal.SIGKILL, tmp_path)
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "out").exists() and any(p.name.startswith(".out.tmp-") for p in work.iterdir())
    assert _main(args)[0] == 0
    assert sorted(p.name for p in work.iterdir()) == ["m", "out"]


def _signalled(args, at: str, sig, tmp_path) -> tuple[subprocess.Popen, str]:
    """Run ``lmpress ARGS`` in a new process held at ``at``; deliver ``sig`` there; its stderr."""
    import lmpress

    marker = tmp_path / "held"
    env = {**os.environ, "PYTHONPATH": str(Path(lmpress.__file__).parents[1]), "STALL_AT": at,
           "STALL_MARKER": str(marker)}
    err_file = tmp_path / "stderr"
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not marker.exists():
            proc.kill()
            proc.wait()
            pytest.fail(f"the process never reached the {at} step: {err_file.read_text()[-2000:]}")
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{sig.name} did not stop lmpress within 30 s")
    return proc, err_file.read_text()


# ---- a full disk --------------------------------------------------------------------------------------


class Disk:
    """A small tmpfs at ``path`` with a filler file that leaves ``free`` bytes (``fill``) until ``empty``."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def fill(self, free: int = 0) -> None:
        import errno

        with open(self.filler, "wb") as f:
            try:
                while os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize > free:
                    f.write(b"\0" * 4096)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC

    def empty(self) -> None:
        self.filler.unlink()

    def contents(self) -> list[str]:
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())


@pytest.fixture
def disk(tmp_path):
    with _tmpfs(tmp_path / "disk", "size=2m") as path:
        yield Disk(path)


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    if not sys.platform.startswith("linux"):
        pytest.skip("a full or read-only disk is simulated with a Linux tmpfs")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {(res.stderr or res.stdout).strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("where", ["-o", "--json"])
def test_read_only_disk_is_refused_before_the_work(where, tiny_inputs, tmp_path, capsys):
    """Issue 14 item 7: a read-only output folder is a one-line error before anything is loaded (as root,
    file modes do not stop a write; a read-only mount does)."""
    work, args = _work(tiny_inputs, tmp_path)
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        if where == "-o":
            args[args.index("-o") + 1] = str(ro / "out")
        else:
            args += ["--json", str(ro / "r.json")]
        before = _tree(work)
        _refused(args, f"cannot write to {ro}", capsys)
        assert _tree(work) == before and not list(ro.iterdir())


def _refused(argv, fragment: str, capsys) -> str:
    got, _ = _main(argv)
    err = capsys.readouterr().err
    assert got == 2, err[-2000:]
    assert fragment in err and "Traceback" not in err, err[-2000:]
    return err


def test_full_disk_under_the_compressed_folder(disk, tiny_inputs, tmp_path, capsys):
    work, args = _work(tiny_inputs, tmp_path)
    args[args.index("-o") + 1] = str(disk.path / "out")
    before = _tree(work)
    disk.fill(free=64 * 1024)  # the save starts and runs out part way
    _refused(args, "No space left on device", capsys)
    assert disk.contents() == ["filler"] and _tree(work) == before
    disk.empty()
    assert _main(args)[0] == 0 and disk.contents() == sorted(f"out/{p.name}" for p in (disk.path / "out").iterdir())


@pytest.mark.parametrize("cmd", ["compress", "eval"])
def test_full_disk_under_the_json_report(cmd, disk, tiny_inputs, tmp_path, capsys):
    import json

    work, args = _work(tiny_inputs, tmp_path)
    if cmd == "eval":
        args = ["eval", str(work / "m"), "--data", str(tiny_inputs / "corpus.txt"), "--no-speed", "--eval-tokens", "64",
                "--context", "16"]
    args += ["--json", str(disk.path / "r.json")]
    disk.fill()
    err = _refused(args, f"could not write {disk.path / 'r.json'} (No space left on device", capsys)
    assert "the figures are printed above" in err
    if cmd == "compress":
        assert f"the model is saved in {work / 'out'} (a rerun replaces it with --overwrite)" in err
    assert disk.contents() == ["filler"]  # no empty report, no temporary file
    disk.empty()
    if cmd == "compress":  # the model was saved before the report failed: a rerun replaces it
        args.append("--overwrite")
    assert _main(args)[0] == 0 and json.loads((disk.path / "r.json").read_text())


@pytest.mark.parametrize("what", ["checkpoint", "topk-cache"])
def test_full_disk_under_distillation_files(what, disk, tiny_inputs, tmp_path, capsys):
    """Issue 14 item 8: a failed checkpoint (or top-k cache) save leaves no temporary file to keep the disk full."""
    work, _ = _work(tiny_inputs, tmp_path)
    args = ["distill", "--teacher", work / "m", "--data", tiny_inputs / "corpus.txt", "-o", work / "s", "--tokens", "128",
            "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64"]
    args += ["--checkpoint-dir", disk.path / "ck"] if what == "checkpoint" else ["--topk", "8", "--topk-cache",
                                                                                  disk.path / "cache"]
    before = _tree(work)
    disk.fill(free=256 * 1024 if what == "checkpoint" else 0)  # the checkpoint (~1.5 MB) runs out part way
    _refused(args, "could not save checkpoint" if what == "checkpoint" else "could not write the top-k cache", capsys)
    assert disk.contents() == ["filler"] and _tree(work) == before
    disk.empty()
    assert _main(args)[0] == 0 and (work / "s" / "config.json").exists()
