"""``lmpress distill`` end to end on a tiny saved model: a one-entry recipe through the API."""

import json

import pytest

import torch
from test_cli import _tok
from tiny import tiny_model

from lmpress.cli import main
from lmpress.io import load_model, save_model


def _setup(tmp_path):
    src = save_model(tiny_model("llama"), tmp_path / "src", tokenizer=_tok(tmp_path))
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(f"w{int(i)}" for i in torch.randint(0, 200, (60,), generator=g)) for _ in range(80)]
    (tmp_path / "c.txt").write_text("\n\n".join(paras))
    return src, tmp_path / "c.txt"


def test_cli_distill_saves_a_loadable_student_with_its_recipe(tmp_path, capsys):
    src, corpus = _setup(tmp_path)
    out = tmp_path / "s"
    argv = ["distill", "--teacher", str(src), "--data", str(corpus), "-o", str(out), "--tokens", "128",
            "--seq-len", "16", "--batch-size", "4", "--lr", "1e-3", "--qat-bits", "4", "--qat-group-size", "32",
            "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert "saved to" in capsys.readouterr().out
    student, _ = load_model(out)
    assert type(student.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    info = student.lmpress_info
    assert info["recipe"][-1]["method"] == "distill" and info["recipe"][-1]["qat_bits"] == 4
    assert info["data"]["corpus"] == str(corpus)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] == 2 and report["output"] == str(out)


def test_cli_distill_never_overwrites_its_inputs(tmp_path, capsys):
    src, corpus = _setup(tmp_path)
    before = (src / "model.safetensors").read_bytes()
    for out in (src, tmp_path):  # the student itself, a folder holding it
        code = main(["distill", "--teacher", str(src), "--student", str(src), "--data", str(corpus), "-o", str(out),
                     "--overwrite", "--tokens", "64", "--seq-len", "16", "--batch-size", "4"])
        err = capsys.readouterr().err
        assert code == 2 and "is or holds the input" in err
    assert (src / "model.safetensors").read_bytes() == before


@pytest.mark.multiprocess
@pytest.mark.parametrize("fsdp", [False, True])
def test_cli_distill_under_torchrun_two_processes(tmp_path, fsdp):
    """``torchrun --nproc-per-node 2 lmpress distill``: both ranks train, rank 0 saves a loadable student
    (with FSDP it is rebuilt whole from the gathered state first)."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    src, corpus = _setup(tmp_path)
    out = tmp_path / "s"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "lmpress.cli", "distill", "--teacher", str(src),
           "--data", str(corpus), "-o", str(out), "--tokens", "128", "--seq-len", "16", "--batch-size", "4",
           "--qat-bits", "4", "--qat-group-size", "32"] + (["--fsdp"] if fsdp else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    student, _ = load_model(out)
    assert type(student.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    assert student.lmpress_info["recipe"][-1]["fsdp"] is fsdp
