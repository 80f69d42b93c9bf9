"""Fault injection: one row per bad input or hostile situation, run through the CLI in-process.

Every row runs ``lmpress.cli.main(argv)`` in a fresh work folder holding a copy of a tiny saved
Llama (``{M}``), after an optional fault is injected there, and checks the same things: the exit
code, a fragment of the message on stderr, no traceback (no exception out of ``main``), and, when
the command is refused, the work folder byte for byte as it was: the input model unchanged,
nothing at the output path or beside it (no ``.out.tmp-*`` folder), no ``--json`` file.

Placeholders in a row's arguments: ``{M}`` the model folder, ``{O}`` the output path (absent
unless the row creates it), ``{W}`` the work folder (``{M}``'s parent), ``{D}`` a good corpus,
``{G}`` a GGUF file in the work folder (written by the gguf faults). ``files`` are written into the
work folder first. Rows marked ``xfail`` (strict) are failures issue 14 reports (or this table
found): fixing one makes it pass, and then its mark must go.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
from pathlib import Path

import pytest
import torch

C = "compress {M} --data {D} --no-eval -o {O}"  # a compress that measures nothing
E = "eval {M} --data {D} --no-speed --eval-tokens 64 --context 16"
G = "compress {G} --data {D} --no-eval -o {O} --method rtn --bits 4"
GPTQ = C + " --method gptq --bits 4 --group-size 32 --calib-samples 2 --calib-len 16"


def row(id, args, rc, fragment, fault=None, files=None, xfail=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(args, rc, fragment, fault, files or {}, id=id, marks=marks)


ROWS = [
    # method options
    row("bits-5", C + " --method rtn --bits 5", 2, "bits must be one of"),
    row("bits-0", C + " --method rtn --bits 0", 2, "bits must be one of"),
    row("bits-word", C + " --method rtn --bits x", 2, "invalid int value"),
    row("head-bits-5", C + " --method rtn --bits 4 --head-bits 5", 2, "bits must be one of"),
    row("group-size-0", C + " --method rtn --bits 4 --group-size 0", 2, "group_size must be positive"),
    row("group-size-minus-2", C + " --method rtn --bits 4 --group-size -2", 2, "group_size must be positive"),
    row("group-size-7", C + " --method rtn --bits 4 --group-size 7", 2, "does not divide"),
    row("sparsity-1.5", C + " --method magnitude --sparsity 1.5", 2, "must lie in [0, 1)"),
    row("sparsity-negative", C + " --method magnitude --sparsity -0.1", 2, "must lie in [0, 1)"),
    row("sparsity-word", C + " --method magnitude --sparsity x", 2, "invalid float value"),
    row("pattern-5:4", C + " --method magnitude --pattern 5:4", 2, "0 < N < M"),
    row("pattern-0:4", C + " --method wanda --pattern 0:4", 2, "0 < N < M"),
    row("pattern-word", C + " --method magnitude --pattern x", 2, "is not N:M"),
    row("ratio-0", C + " --method svd --ratio 0", 2, "ratio must be in (0, 1]"),
    row("ratio-1.5", C + " --method svd --ratio 1.5", 2, "ratio must be in (0, 1]"),
    row("target-params-0", C + " --method prune-width --target-params 0", 2, "must lie in (0, 1]"),
    row("target-params-1.5", C + " --method prune-width --target-params 1.5", 2, "must lie in (0, 1]"),
    row("method-unknown", C + " --method nope", 2, "unknown method 'nope'"),
    row("method-none", C + " --bits 4", 2, "exactly one of --method"),
    row("method-and-recipe", C + " --method rtn --recipe {W}/r.yaml", 2, "exactly one of --method", files={"r.yaml": "- method: rtn\n"}),
    row("set-unknown-key", C + " --method rtn --set nosuch=1", 2, "has no option(s) nosuch"),
    row("set-no-equals", C + " --method rtn --set bits", 2, "KEY=VALUE"),
    row("set-bits-word", C + " --method rtn --set bits=x", 2, "bits must be"),
    row("set-bad-yaml", C + " --method rtn --set bits=[1", 2, "not valid YAML"),
    row("set-bits-float", C + " --method rtn --set bits=4.0", 2, "bits must be"),
    # recipes
    row("recipe-missing", C + " --recipe {W}/nope.yaml", 2, "no such recipe file"),
    row("recipe-bad-yaml", C + " --recipe {W}/r.yaml", 2, "is not valid YAML", files={"r.yaml": "- method: [rtn\n"}),
    row("recipe-not-a-list", C + " --recipe {W}/r.yaml", 2, "a recipe is a YAML list", files={"r.yaml": "method: rtn\n"}),
    row("recipe-entry-without-method", C + " --recipe {W}/r.yaml", 2, "has no 'method'", files={"r.yaml": "- bits: 4\n"}),
    row("recipe-unknown-key", C + " --recipe {W}/r.yaml", 2, "has no option(s) colour", files={"r.yaml": "- method: rtn\n  colour: red\n"}),
    row("recipe-bits-float", C + " --recipe {W}/r.yaml", 2, "bits must be", files={"r.yaml": "- method: rtn\n  bits: 4.0\n"}),
    row("recipe-group-size-string", C + " --recipe {W}/r.yaml", 2, "group_size must be",
        files={"r.yaml": "- method: rtn\n  bits: 4\n  group_size: '32'\n"}),
    # the model
    row("model-missing", "compress {W}/nope --data {D} --no-eval -o {O} --method rtn --bits 4", 2, "no such model"),
    row("model-file-not-gguf", "compress {M}/config.json --data {D} --no-eval -o {O} --method rtn --bits 4", 2, "must be .gguf"),
    row("config-missing", C + " --method rtn --bits 4", 2, "has no config.json", fault="delete-config"),
    row("config-corrupt", C + " --method rtn --bits 4", 2, "is not valid JSON", fault="corrupt-config"),
    row("config-truncated", C + " --method rtn --bits 4", 2, "is not valid JSON", fault="truncate-config"),
    row("config-unknown-type", C + " --method rtn --bits 4", 2, "not a configuration transformers knows", fault="unknown-model-type"),
    row("config-remote-code", C + " --method rtn --bits 4", 2, "--trust-remote-code", fault="remote-code-config"),
    row("safetensors-corrupt", C + " --method rtn --bits 4", 2, "not a readable safetensors file", fault="corrupt-safetensors"),
    row("safetensors-truncated", C + " --method rtn --bits 4", 2, "is truncated", fault="truncate-safetensors"),
    row("weights-missing", C + " --method rtn --bits 4", 2, "no weights", fault="delete-weights"),
    row("pickle-only", C + " --method rtn --bits 4", 2, "--allow-pickle", fault="pickle-only"),
    row("gguf-corrupt", G, 2, "not a readable GGUF file", fault="corrupt-gguf"),
    row("gguf-truncated", G, 2, "not a readable GGUF file", fault="truncate-gguf"),
    row("tokenizer-remote-code", C + " --method rtn --bits 4", 2, "--trust-remote-code", fault="remote-code-tokenizer"),
    row("tensor-missing", C + " --method rtn --bits 4", 2, "lack", fault="drop-tensor"),
    row("weights-nan", C + " --method rtn --bits 4", 2, "NaN", fault="nan-weight"),
    # data
    row("data-missing", C + " --method rtn --bits 4 --data {W}/nope.txt", 2, "no such corpus"),
    row("data-empty", C + " --method rtn --bits 4 --data {W}/d.txt", 2, "holds no text", files={"d.txt": "\n\n  \n"}),
    row("data-not-utf8", C + " --method rtn --bits 4 --data {W}/d.txt", 2, "not UTF-8", files={"d.txt": b"\xff\xfe\x00bad"}),
    row("data-folder-without-text", C + " --method rtn --bits 4 --data {W}/d", 2, "holds no .txt", files={"d/x.bin": b"\0"}),
    row("data-jsonl-bad-line", C + " --method rtn --bits 4 --data {W}/d.jsonl", 2, "line 2", files={"d.jsonl": '{"text": "a"}\n{oops\n'}),
    row("calib-samples-0", GPTQ + " --calib-samples 0", 2, "--calib-samples"),
    row("calib-samples-negative", GPTQ + " --calib-samples -1", 2, "--calib-samples"),
    row("calib-len-0", GPTQ + " --calib-len 0", 2, "--calib-len"),
    row("context-0", E + " --context 0", 2, "--context"),
    row("context-1", E + " --context 1", 2, "--context"),
    row("eval-tokens-0", E + " --eval-tokens 0", 2, "--eval-tokens"),
    row("eval-tokens-negative", E + " --eval-tokens -5", 2, "--eval-tokens"),
    # the output
    row("output-exists", C + " --method rtn --bits 4", 2, "already exists", files={"out/notes.txt": "mine"}),
    row("output-is-a-file", C + " --method rtn --bits 4", 2, "already exists", files={"out": "mine"}),
    row("output-is-the-input", C.replace("{O}", "{M}") + " --method rtn --bits 4", 2, "is or holds the input"),
    row("overwrite-the-input", C.replace("{O}", "{M}") + " --method rtn --bits 4 --overwrite", 2, "holds the input"),
    row("overwrite-the-inputs-parent", C.replace("{O}", "{W}") + " --method rtn --bits 4 --overwrite", 2, "holds the input"),
    row("overwrite-a-file", C + " --method rtn --bits 4 --overwrite", 2, "not an lmpress output", files={"out": "mine"}),
    row("overwrite-a-foreign-folder", C + " --method rtn --bits 4 --overwrite", 2, "not an lmpress output",
        files={"out/notes.txt": "mine"}),
    row("json-in-missing-folder", C + " --method rtn --bits 4 --json {W}/nodir/r.json", 2, "does not exist"),
    row("json-onto-the-models-config", C + " --method rtn --bits 4 --json {M}/config.json", 2, "lies inside the input"),
    row("eval-json-onto-the-weights", E + " --json {M}/model.safetensors", 2, "lies inside the input"),
    row("eval-json-onto-the-corpus", E.replace("{D}", "{W}/d.txt") + " --json {W}/d.txt", 2, "is or holds the input",
        files={"d.txt": "w1 w2 w3\n\n" * 200}),
    row("output-inside-the-input", C.replace("{O}", "{M}/q") + " --method rtn --bits 4", 2, "lies inside the input"),
    row("overwrite-the-folder-holding-the-recipe", C.replace("{O}", "{W}/prev") + " --recipe {W}/prev/r.yaml --overwrite",
        2, "is or holds the input {W}/prev/r.yaml", fault="lmpress-output-prev", files={"prev/r.yaml": "- method: rtn\n"}),
    # found in issue 14's list, fixed with the rows above
    row("pattern-2:3-sparsegpt", C + " --method sparsegpt --pattern 2:3", 2, "multiple of M=3"),
    row("reference-other-vocabulary", E + " --reference {W}/other", 2, "same vocabulary", fault="other-vocab-reference"),
    row("lmpress-layout-tampered", "eval {W}/q --data {D} --no-speed --eval-tokens 64 --context 16", 2,
        "does not match the tensors", fault="tampered-layers"),
    row("context-past-learned-positions", E.replace("--context 16", "--context 300"), 2, "learned positions",
        fault="gpt2-model"),
    row("calib-len-past-learned-positions", GPTQ.replace("--calib-len 16", "--calib-len 300"), 2, "learned positions",
        fault="gpt2-model"),
    row("info-without-tokenizer", "info {M}", 0, "", fault="delete-tokenizer"),
    # issue 14 items 3, 4, 6 and 7, walked again: each row fails without its fix
    row("weights-inf", C + " --method rtn --bits 4", 2, "NaN or infinite", fault="inf-weight"),
    row("remote-code-decoder-refused", C + " --method rtn --bits 4", 2, "--trust-remote-code", fault="remote-code-decoder"),
    row("remote-code-decoder-info-refused", "info {M}", 2, "--trust-remote-code", fault="remote-code-decoder"),
    row("compress-remote-code-decoder-trusted", C + " --method rtn --bits 4 --trust-remote-code", 0, "",
        fault="remote-code-decoder"),
    row("eval-remote-code-decoder-trusted", E + " --trust-remote-code", 0, "", fault="remote-code-decoder"),
    row("compress-pickle-allowed", C + " --method rtn --bits 4 --allow-pickle", 0, "", fault="pickle-only"),
    row("gguf-beside-a-remote-code-tokenizer", G, 2, "--trust-remote-code", fault="gguf-remote-code-tokenizer"),
    row("seq-len-past-learned-positions", "distill --teacher {M} --data {D} -o {O} --tokens 640 --seq-len 300 "
        "--batch-size 2", 2, "learned positions", fault="gpt2-model"),
]


@pytest.mark.parametrize("args,rc,fragment,fault,files", ROWS)
def test_fault(args, rc, fragment, fault, files, tiny_inputs, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_inputs / "model", work / "m")
    for name, content in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        getattr(work / name, "write_bytes" if isinstance(content, bytes) else "write_text")(content)
    if fault:
        FAULTS[fault](work, tiny_inputs)
    before = _tree(work)
    paths = dict(M=work / "m", O=work / "out", W=work, D=tiny_inputs / "corpus.txt", G=work / "m.gguf")
    argv = [a.format(**paths) for a in args.split()]
    fragment = fragment.format(**paths)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # a prompt would read nothing
    from lmpress.cli import main

    try:
        got = main(argv)
    except SystemExit as e:  # argparse
        got = e.code
    except Exception as e:  # what the CLI would print as a traceback
        pytest.fail(f"traceback: {type(e).__name__}: {str(e)[:300]}")
    out = capsys.readouterr()
    assert got == rc, out.err[-2000:]
    assert fragment.lower() in out.err.lower(), out.err[-2000:]
    assert "Traceback" not in out.err + out.out
    assert "[y/N]" not in out.err + out.out, "loading asked whether to run code"
    if rc == 0 and "-o" in argv:
        assert (work / "out" / "config.json").exists()
    if rc != 0:
        after = _tree(work)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"a refused command changed the work folder: {changed[:10]}"


def _tree(root: Path) -> dict[str, str]:
    """``{relative path: sha256 of the bytes, or 'dir'}`` of everything under ``root``."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """A saved tiny Llama with a word-level tokenizer, a corpus of its words, a tiny GGUF file."""
    from gguf_writer import write_tiny_llama_gguf
    from test_cli import _tok
    from tiny import tiny_model

    from lmpress.io import save_model

    root = tmp_path_factory.mktemp("faults")
    save_model(tiny_model("llama"), root / "model", tokenizer=_tok(root))
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 200, (200, 60), generator=g).tolist()
    (root / "corpus.txt").write_text("\n\n".join(" ".join(f"w{i}" for i in para) for para in words))
    write_tiny_llama_gguf(root / "tiny.gguf", seed=7)
    return root


# ---- faults: each changes the work folder before the command runs ------------------------------------


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _edit_json(file: Path, **fields) -> None:
    import json

    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))


def _edit_tensors(work: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = work / "m" / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _remote_code_tokenizer(work: Path, _, folder: Path | None = None) -> None:
    folder = folder or work / "m"
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
               auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (folder / "evil.py").write_text(  # if it ever runs, it leaves a file the tree check sees
        "import pathlib\npathlib.Path(__file__).with_name('ran').write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )


def _pickle_only(work: Path, _) -> None:
    from safetensors.torch import load_file

    file = work / "m" / "model.safetensors"
    torch.save(load_file(file), work / "m" / "pytorch_model.bin")
    file.unlink()


def _save_tiny(folder: Path, kind: str, **config) -> None:
    from test_cli import _tok
    from tiny import tiny_model

    from lmpress.io import save_model

    model = tiny_model(kind)
    for k, v in config.items():
        setattr(model.config, k, v)
    save_model(model if not config else type(model)(model.config), folder, tokenizer=_tok(folder.parent))


def _other_vocab(work: Path, _) -> None:
    _save_tiny(work / "other", "llama", vocab_size=300)


def _tampered_layers(work: Path, _) -> None:
    import json

    from tiny import tiny_model

    from lmpress.io import save_model
    from lmpress.recipe import RunContext, apply, make_config

    model = tiny_model("llama")
    apply(model, make_config("rtn", bits=4, group_size=32), RunContext(progress=False))
    save_model(model, work / "q", format="lmpress")
    cfg_file = work / "q" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lmpress"]["layers"]["model.layers.0.mlp.up_proj"]["bits"] = 8  # tensors were packed at 4 bits
    cfg_file.write_text(json.dumps(cfg))


def _gpt2_model(work: Path, _) -> None:
    import shutil

    shutil.rmtree(work / "m")
    _save_tiny(work / "m", "gpt2")


def _delete_tokenizer(work: Path, _) -> None:
    for f in (work / "m").glob("*token*"):
        f.unlink()


def _lmpress_output_prev(work: Path, _) -> None:
    """An earlier lmpress output at ``{W}/prev`` (which --overwrite may replace), a recipe kept inside it."""
    from tiny import tiny_model

    from lmpress.io import save_model

    save_model(tiny_model("llama"), work / "prev.tmp")
    for f in (work / "prev.tmp").iterdir():
        f.rename(work / "prev" / f.name)
    (work / "prev.tmp").rmdir()


def _remote_code_decoder(work: Path, _) -> None:
    """A decoder whose config names its own classes (a Llama under another model_type), and the code."""
    (work / "m" / "modeling_mylm.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\nclass MyConfig(LlamaConfig):\n"
        "    model_type = 'mylm'\n\n\nclass MyForCausalLM(LlamaForCausalLM):\n    config_class = MyConfig\n"
    )
    _edit_json(work / "m" / "config.json", model_type="mylm", architectures=["MyForCausalLM"],
               auto_map={"AutoConfig": "modeling_mylm.MyConfig", "AutoModelForCausalLM": "modeling_mylm.MyForCausalLM"})


def _gguf_remote_code_tokenizer(work: Path, inputs: Path) -> None:
    """A good GGUF file in a folder whose tokenizer_config.json names code (transformers reads it too)."""
    (work / "m.gguf").write_bytes((inputs / "tiny.gguf").read_bytes())
    shutil.copy(work / "m" / "tokenizer_config.json", work / "tokenizer_config.json")
    _remote_code_tokenizer(work, None, folder=work)


FAULTS = {
    "gguf-remote-code-tokenizer": _gguf_remote_code_tokenizer,
    "remote-code-decoder": _remote_code_decoder,
    "inf-weight": lambda work, _: _edit_tensors(work, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("inf"))),
    "lmpress-output-prev": _lmpress_output_prev,
    "other-vocab-reference": _other_vocab,
    "tampered-layers": _tampered_layers,
    "gpt2-model": _gpt2_model,
    "delete-tokenizer": _delete_tokenizer,
    "delete-config": lambda work, _: (work / "m" / "config.json").unlink(),
    "corrupt-config": lambda work, _: (work / "m" / "config.json").write_text("{not json"),
    "truncate-config": lambda work, _: _truncate(work / "m" / "config.json"),
    "unknown-model-type": lambda work, _: _edit_json(work / "m" / "config.json", model_type="no-such-model"),
    "remote-code-config": lambda work, _: _edit_json(work / "m" / "config.json", auto_map={"AutoModelForCausalLM": "evil.M"}),
    "corrupt-safetensors": lambda work, _: (work / "m" / "model.safetensors").write_bytes(b"not safetensors" * 64),
    "truncate-safetensors": lambda work, _: _truncate(work / "m" / "model.safetensors"),
    "delete-weights": lambda work, _: (work / "m" / "model.safetensors").unlink(),
    "pickle-only": _pickle_only,
    "corrupt-gguf": lambda work, _: (work / "m.gguf").write_bytes(b"GGUF" + b"\x07" * 256),
    "truncate-gguf": lambda work, inputs: (work / "m.gguf").write_bytes((inputs / "tiny.gguf").read_bytes()[:4096]),
    "remote-code-tokenizer": _remote_code_tokenizer,
    "drop-tensor": lambda work, _: _edit_tensors(work, lambda t: t.pop("model.layers.0.mlp.down_proj.weight")),
    "nan-weight": lambda work, _: _edit_tensors(work, lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan"))),
}


# ---- issue 14's items that are not one refused command ------------------------------------------------


def _ev(tiny_inputs) -> list[str]:
    return ["--data", str(tiny_inputs / "corpus.txt"), "--no-speed", "--eval-tokens", "64", "--context", "16"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_original_is_reported_as_stored(dtype, tiny_inputs, tmp_path, capsys):
    """Item 10: a bf16/fp16 checkpoint is held in float32, but eval, info and compress's 'before' give
    its bits per weight as stored (16); the compressed side counts what lmpress holds and saves."""
    import json

    from test_cli import _tok
    from tiny import tiny_model

    from lmpress.cli import main
    from lmpress.counts import param_counts
    from lmpress.io import load_model
    from lmpress.recipe import RunContext, apply, make_config

    half = tmp_path / "half"
    tiny_model("llama").to(getattr(torch, dtype)).save_pretrained(half)
    _tok(tmp_path).save_pretrained(half)
    assert main(["eval", str(half), *_ev(tiny_inputs), "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["linear_bits_per_weight"] == 16 and e["disk_bytes"] == (half / "model.safetensors").stat().st_size
    capsys.readouterr()
    assert main(["info", str(half), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["dtype"], info["dtype_in_memory"], info["linear_bits_per_weight"]) == (dtype, "float32", 16)
    rtn = ["--method", "rtn", "--bits", "4", "--group-size", "32"]
    for src, name in ((half, "h"), (tiny_inputs / "model", "f")):
        assert main(["compress", str(src), *_ev(tiny_inputs), *rtn, "-o", str(tmp_path / name),
                     "--json", str(tmp_path / f"{name}.json")]) == 0
    h, f = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "hf")
    assert (h["before"]["linear_bits_per_weight"], f["before"]["linear_bits_per_weight"]) == (16, 32)
    assert h["before"]["disk_bytes"] == e["disk_bytes"] < f["before"]["disk_bytes"]
    assert h["after"]["linear_bits_per_weight"] == f["after"]["linear_bits_per_weight"] == 5  # 4 bits + fp16 scale / 32
    # once a method changes the loaded model, its tensors count as held (and saved): as the fp32 model's
    models = [load_model(p, tokenizer=False)[0] for p in (half, tiny_inputs / "model")]
    for m in models:
        apply(m, make_config("svd", ratio=0.5), RunContext(progress=False))
    assert param_counts(models[0]) == param_counts(models[1])


def test_outputs_follow_the_umask(tiny_inputs, tmp_path, capsys):
    """Item 10: the output folder, every file in it and the --json report get the modes the umask
    allows (tempfile and safetensors make 0700 folders and 0600 files whatever the umask)."""
    import os
    import stat

    from lmpress.cli import main

    old = os.umask(0o027)
    try:
        assert main(["compress", str(tiny_inputs / "model"), *_ev(tiny_inputs), "--method", "rtn", "--bits", "4",
                     "-o", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")]) == 0
    finally:
        os.umask(old)
    paths = [tmp_path / "out", *(tmp_path / "out").iterdir(), tmp_path / "r.json"]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    assert modes == {p.name: oct(0o750 if p.is_dir() else 0o640) for p in paths}


def test_context_past_a_rotary_models_trained_positions_warns(tiny_inputs, tmp_path, capsys):
    """Item 10: a rotary model runs past its trained context (256 here), with a warning."""
    from lmpress.cli import main

    args = [{"16": "300", "64": "400"}.get(a, a) for a in _ev(tiny_inputs)]
    with pytest.warns(UserWarning, match="past the model's trained context of 256"):
        assert main(["eval", str(tiny_inputs / "model"), *args]) == 0


def test_overwrite_never_replaces_the_built_in_model(tiny_inputs, tmp_path, monkeypatch, capsys):
    """Item 1: the built-in model's cache folder (named, or the default) is an input too; lmpress wrote
    it, so without this check --overwrite would replace it."""
    from test_cli import _tok
    from tiny import tiny_model

    from lmpress.assets import model_cache_dir
    from lmpress.cli import main
    from lmpress.io import save_model

    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path / "cache"))
    builtin = save_model(tiny_model("llama"), model_cache_dir(), tokenizer=_tok(tmp_path))
    before = _tree(builtin)
    for model in ([], ["smollm2-135m"]):
        for out in (builtin, builtin.parent):
            argv = ["compress", *model, "--data", str(tiny_inputs / "corpus.txt"), "--no-eval", "--method", "rtn",
                    "--bits", "4", "-o", str(out), "--overwrite"]
            assert main(argv) == 2 and "is or holds the input" in capsys.readouterr().err
    assert _tree(builtin) == before


def test_two_gptq_runs_write_identical_bytes(tiny_inputs, tmp_path, capsys):
    """Item 9: the same compression run twice writes the same bytes, file for file (the default format
    and lmpress's own layout)."""
    from lmpress.cli import main

    for fmt in ("auto", "lmpress"):
        digests = []
        for i in range(2):
            out = tmp_path / f"{fmt}{i}"
            args = GPTQ.format(M=tiny_inputs / "model", D=tiny_inputs / "corpus.txt", O=out).split()
            assert main([*args, "--format", fmt]) == 0
            digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()})
        assert digests[0] == digests[1] and "model.safetensors" in digests[0]
