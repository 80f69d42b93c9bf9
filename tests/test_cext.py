"""C++ extension builds (lmpress.cext): a killed build never blocks a later run, installs never share.

The builds here are of a tiny Python-only module (no torch headers, about a second to compile);
kernels._build with its source folder redirected drives the same path as the real kernels.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cext

TINY = """#include <Python.h>
#define STR_(x) #x
#define STR(x) STR_(x)
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), NULL, -1, NULL};
PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject *m = PyModule_Create(&def);
  if (m) PyModule_AddIntConstant(m, "value", VALUE);
  return m;
}
"""
# A child build through kernels._build with the source folder redirected (works before and after cext).
BUILD = ("import pathlib, sys, lmpress.quant.kernels as k; k._CSRC = pathlib.Path(sys.argv[1]); "
         "print('value', k._build('lmpress_t', ('ext.cpp',)).value)")


def _source(folder: Path, value: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ext.cpp").write_text(TINY.replace("VALUE", str(value)))
    return folder / "ext.cpp"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ext"


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    from lmpress.cext import cache_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "t"))
    assert cache_root() == tmp_path / "t"


def test_two_installs_build_apart_and_never_rebuild_each_other(tmp_path, cache):
    from lmpress.cext import COMPLETE, build_folder, load_extension

    a, b = _source(tmp_path / "a", 1), _source(tmp_path / "b", 2)
    assert load_extension("lmpress_t", [a], [], []).value == 1
    so_a = next(build_folder("lmpress_t", [a], [], []).glob("*.so"))
    built_a = so_a.stat().st_mtime_ns
    assert load_extension("lmpress_t", [b], [], []).value == 2
    fa, fb = build_folder("lmpress_t", [a], [], []), build_folder("lmpress_t", [b], [], [])
    assert fa != fb and fa.parent == fb.parent == cache
    assert (fa / COMPLETE).exists() and (fb / COMPLETE).exists()
    assert build_folder("lmpress_t", [a], ["-O2"], []) != fa  # flags are part of the build too
    assert load_extension("lmpress_t", [a], [], []).value == 1
    assert so_a.stat().st_mtime_ns == built_a  # b's build left a's alone


def test_a_header_that_a_source_includes_changes_the_build(tmp_path, cache):
    """A header beside the sources takes part in the digest: editing it builds anew, with the new value."""
    from lmpress.cext import build_folder, load_extension

    folder = tmp_path / "h"
    src = _source(folder, 0)
    src.write_text('#include "value.h"\n' + TINY)  # VALUE comes from the header
    (folder / "value.h").write_text("#define VALUE 3\n")
    before = build_folder("lmpress_t", [src], [], [])
    assert load_extension("lmpress_t", [src], [], []).value == 3
    (folder / "value.h").write_text("#define VALUE 4\n")
    assert build_folder("lmpress_t", [src], [], []) != before


def test_stale_torch_lock_in_a_built_folder_does_not_block(tmp_path, cache):
    from lmpress.cext import build_folder, load_extension

    src = _source(tmp_path / "s", 3)
    load_extension("lmpress_t", [src], [], [])
    lock = build_folder("lmpress_t", [src], [], []) / "lock"
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))  # as torch's FileBaton.try_acquire, never released
    code = "import sys; from lmpress.cext import load_extension as l; print(l('lmpress_t', [sys.argv[1]], [], []).value)"
    res = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "3", res.stderr
    assert "stale build lock" in res.stderr and not lock.exists()


def test_killed_build_does_not_block_and_the_waiter_says_whom_it_waits_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    src = _source(tmp_path / "s", 4).parent
    slow = tmp_path / "slow-g++"  # compiles after a minute: the first build is killed in there
    slow.write_text('#!/bin/sh\ncase " $* " in *" -c "*) sleep 60;; esac\nexec c++ "$@"\n')
    slow.chmod(0o755)
    first = subprocess.Popen([sys.executable, "-c", BUILD, str(src)], env={**os.environ, "CXX": str(slow)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second = None
    try:
        _until(lambda: any((tmp_path / "ext").rglob("lock")), "the first build to start")
        err = tmp_path / "second.err"
        with open(err, "w") as f:
            second = subprocess.Popen([sys.executable, "-c", BUILD, str(src)], stdout=subprocess.PIPE, stderr=f, text=True)
        _until(lambda: f"(pid {first.pid})" in err.read_text(), "a waiting message naming the first build's pid")
        assert "waiting for another lmpress process building lmpress_t" in err.read_text()
        os.killpg(first.pid, signal.SIGTERM)  # the build's whole job, as a scheduler or Ctrl-C would
        first.wait(timeout=30)
        out, _ = second.communicate(timeout=120)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
    assert second.returncode == 0 and out.strip() == "value 4", err.read_text()
    assert "interrupted" in err.read_text() and not any((tmp_path / "ext").rglob("lock"))


def _until(ok, what: str, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not ok():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
