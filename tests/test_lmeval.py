"""lm-evaluation-harness on the in-memory model gives lmpress's own multiple-choice figures."""

import json
import sys

import pytest
import torch
from test_cli import _tok
from tiny import tiny_model

from lmpress.errors import InputError


@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval")


def _task_file(tmp_path):
    """A BIG-bench-style task.json: 8 items whose choices have 1 to 3 words (so acc and acc_norm can differ)."""
    examples = []
    for i in range(8):
        choices = [" ".join(f"w{(11 * i + 5 * j + k) % 200}" for k in range(1 + (i + j) % 3)) for j in range(3)]
        examples.append({"input": f"w{i} w{i + 20} w{i + 40}", "target_scores": {c: int(j == i % 3) for j, c in enumerate(choices)}})
    path = tmp_path / "tiny_task" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"examples": examples, "example_input_prefix": "w1 ", "example_output_prefix": " w2 "}))
    return str(path)


def _rtn_with_head(model):
    import lmpress

    lmpress.quantize_(model, lmpress.RTNConfig(bits=4, group_size=32, head_bits=8))
    return model


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), lambda: _rtn_with_head(tiny_model("llama"))],
                         ids=["float", "rtn-quantlinear"])
def test_harness_acc_equals_multiple_choice(lm_eval, tmp_path, make):
    from lmpress.evaluate import multiple_choice
    from lmpress.lmeval import evaluate_lm_eval
    from lmpress.tasks import load_task

    model, tok, task = make(), _tok(tmp_path), _task_file(tmp_path)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    before = model(ids).logits
    res = evaluate_lm_eval(model, tok, task, limit=0)
    own = multiple_choice(model, tok, load_task(task))
    assert torch.equal(model(ids).logits, before)  # HFLM took the model as it is
    assert tok.pad_token is None  # and left the caller's tokenizer alone
    assert res["lm_eval_items"] == own.items == 8
    assert (res["lm_eval_acc"], res["lm_eval_acc_norm"]) == (own.acc, own.acc_norm)
    assert res["lm_eval_task"] == task and res["lm_eval_version"] == lm_eval.__version__


def test_harness_loglikelihoods_equal_choice_loglik(lm_eval, tmp_path):
    """Per choice, not only per argmax: the rows' convention (BOS text, leading space) is lmpress's."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmpress.evaluate import choice_loglik
    from lmpress.lmeval import harness_items
    from lmpress.tasks import load_task

    model, tok = tiny_model("llama"), _tok(tmp_path)
    items = load_task(_task_file(tmp_path))
    rows = harness_items(items, tok.bos_token)
    pairs = [(r["prompt"], c) for r in rows for c in r["choices"]]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = [ll for ll, _ in HFLM(pretrained=model, tokenizer=tok, batch_size=4, add_bos_token=False).loglikelihood(reqs)]
    want = [choice_loglik(model, tok, it["prompt"].rstrip(), " " + c.strip()) for it in items for c in it["choices"]]
    assert got == pytest.approx(want, abs=1e-4)


def test_task_names_are_prefixed_and_safe():
    from lmpress.lmeval import task_name

    assert task_name("social_iqa") == "lmpress_social_iqa"
    assert task_name("/x/My-Task/task.json") == "lmpress_my_task"
    assert task_name("/x/other.json") == "lmpress_other"


def test_missing_lm_eval_names_the_extra(monkeypatch, tmp_path):
    from lmpress.lmeval import evaluate_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(InputError, match=r"pip install 'lmpress\[lm-eval\]'"):
        evaluate_lm_eval(tiny_model("llama"), _tok(tmp_path), _task_file(tmp_path))


def test_cli_eval_lm_eval_equals_its_own_scorer(lm_eval, tmp_path):
    """``lmpress eval --task T --lm-eval T``: the harness and lmpress's scorer agree on the same items."""
    from lmpress.cli import main
    from lmpress.io import save_model

    save_model(tiny_model("llama"), tmp_path / "m", tokenizer=_tok(tmp_path))
    g = torch.Generator().manual_seed(0)
    (tmp_path / "c.txt").write_text("\n\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 200, (40,), generator=g))
                                                for _ in range(200)))
    task = _task_file(tmp_path)
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "c.txt"), "--eval-tokens", "128", "--context", "32",
                 "--no-speed", "--task", task, "--lm-eval", task, "--json", str(tmp_path / "f.json")]) == 0
    figs = json.loads((tmp_path / "f.json").read_text())
    assert figs["lm_eval_items"] == figs["mc_items"] == 8
    assert figs["lm_eval_acc"] == figs["mc_acc"] and figs["lm_eval_acc_norm"] == figs["mc_acc_norm"]
