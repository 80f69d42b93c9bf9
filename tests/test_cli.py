import subprocess
import sys


def test_import_is_cheap_and_silent():
    code = "import sys, lmpress; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""


def test_api_functions_named_like_submodules_stay_functions():
    """Importing lmpress.evaluate (the module) or lmpress.distill (the package) must not turn the API
    functions lmpress.evaluate / lmpress.distill into modules (README: lmpress.evaluate(model, tok))."""
    code = ("import lmpress, lmpress.api, lmpress.evaluate, lmpress.distill.engine, inspect; "
            "from lmpress.evaluate import perplexity; "
            "print(inspect.isfunction(lmpress.evaluate), inspect.isfunction(lmpress.distill), "
            "lmpress.evaluate.__module__, lmpress.distill.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "lmpress.api", "lmpress.distill.engine"]


def test_cli_error_is_one_line_not_a_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lmpress.cli", "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert res.returncode == 2
    assert "no such model" in res.stderr and "Traceback" not in res.stderr


def test_cli_info_on_a_saved_model(tmp_path, capsys):
    from tiny import tiny_model

    from lmpress.cli import main
    from lmpress.io import save_model

    save_model(tiny_model("llama"), tmp_path / "m", tokenizer=_tok(tmp_path))
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "compressible_linears" in out


def _tok(tmp_path):
    """A real (tiny) fast tokenizer built in-process: word-level over a small vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(200)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
