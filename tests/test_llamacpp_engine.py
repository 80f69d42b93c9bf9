"""lmpress eval --engine llama.cpp refuses what it cannot run, before any work (no llama-cpp-python needed)."""

import sys

import pytest

from lmpress.cli import main
from lmpress.errors import InputError
from lmpress import llamacpp


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(InputError, match=r"lmpress\[llamacpp\]"):
        llamacpp.require()


def test_cli_refuses_missing_extra_and_non_gguf(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["eval", str(folder), "--engine", "llama.cpp"]) == 2
    assert "lmpress[llamacpp]" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", type(sys)("llama_cpp"))  # installed
    assert main(["eval", str(folder), "--engine", "llama.cpp"]) == 2
    assert "runs a .gguf file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing written
