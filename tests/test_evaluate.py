import importlib
import math

import pytest
import torch
from tiny import KINDS, tiny_model

ev = importlib.import_module("lmpress.evaluate")  # the module (lmpress.evaluate is the API function)


def test_windows_protocol():
    stream = torch.arange(10, 40)
    ids, starts = ev.windows(stream, context=8, bos=1)
    assert ids.shape == (4, 8) and (ids[:, 0] == 1).all()
    assert torch.equal(ids[1, 1:], torch.arange(17, 24)) and starts == [0, 0, 0, 0]
    ids, starts = ev.windows(stream, context=8, bos=None, stride=4)
    assert starts[0] == 0 and starts[1] == 4


def _trained_bigram_model():
    """A tiny model that has learned a fixed cyclic sequence, so perplexity has meaning."""
    model = tiny_model("llama").train()
    seq = torch.tensor([[1] + [3 + (i * 5) % 17 for i in range(31)]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(seq, labels=seq, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), seq[0, 1:]


def test_perplexity_lower_on_own_greedy_continuation_than_shuffled():
    model, _ = _trained_bigram_model()
    prompt = torch.tensor([[1, 3]])
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=63, do_sample=False, pad_token_id=0)[0, 1:]
    shuffled = greedy[torch.randperm(len(greedy), generator=torch.Generator().manual_seed(0))]
    p_own = ev.perplexity(model, greedy, context=32, bos=1)
    p_shuf = ev.perplexity(model, shuffled, context=32, bos=1)
    assert p_own.tokens == p_shuf.tokens == 62
    assert p_own.ppl < p_shuf.ppl / 2


def test_perplexity_matches_hf_loss():
    model = tiny_model("llama")
    stream = torch.randint(3, 256, (63,), generator=torch.Generator().manual_seed(0))
    res = ev.perplexity(model, stream, context=64, bos=1)
    ids = torch.cat([torch.tensor([1]), stream])[None]
    with torch.no_grad():
        loss = model(ids, labels=ids, use_cache=False).loss.item()
    assert math.isclose(res.nll, loss, rel_tol=1e-5)


def test_kl_zero_against_itself_and_positive_against_other():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    stream = torch.randint(3, 256, (90,), generator=torch.Generator().manual_seed(0))
    same = ev.compare(a, a, stream, context=32, bos=1)
    assert abs(same.kl) < 1e-6 and same.top1 == 1.0
    other = ev.compare(a, b, stream, context=32, bos=1)
    assert other.kl > 1e-3 and other.top1 < 1.0
    # evaluation must not leave inference mode (or no-grad) switched on for the caller
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_multiple_choice_prefers_learned_continuation(byte_tok):
    model = tiny_model("llama")
    items = [{"prompt": "abc", "choices": ["x", "y"], "answer": 0}]
    la = ev.choice_loglik(model, byte_tok, "abc", " x")
    lb = ev.choice_loglik(model, byte_tok, "abc", " y")
    res = ev.multiple_choice(model, byte_tok, items)
    assert res.items == 1 and res.acc == float(la > lb)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_choices_score_as_one_at_a_time(byte_tok, kind):
    """Choices of different lengths after one shared prompt: each scores what a forward of it alone gives."""
    model = tiny_model(kind)
    choices = [" x", " longer choice", " yz"]
    together = ev.choice_logliks(model, byte_tok, "a prompt", choices)
    ids_alone = []
    for c in choices:
        p = [byte_tok.bos_token_id] + byte_tok("a prompt", add_special_tokens=False)["input_ids"]
        ids = p + byte_tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        ids_alone.append(sum(lp[i - 1, ids[i]].item() for i in range(len(p), len(ids))))
    assert together == pytest.approx(ids_alone, abs=1e-4)
    assert len(set(together)) == 3


def test_speed_and_sizes_are_positive():
    model = tiny_model("llama")
    sp = ev.speed(model, prompt_tokens=16, new_tokens=4, repeats=1)
    assert sp.prefill_tps > 0 and sp.decode_tps > 0
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert ev.tensor_bytes(model) == 4 * params + buffers


def test_bigbench_task_file_parsing(tmp_path):
    import json

    import pytest

    from lmpress.errors import InputError
    from lmpress.tasks import load_task

    f = tmp_path / "task.json"
    f.write_text(json.dumps({"examples": [
        {"input": "Sky colour?", "target_scores": {"green": 0, "blue": 1}},
        {"input": "No scores", "target": "x"},
        {"input": "Two plus two?", "target_scores": {"four": 1, "five": 0}},
    ]}))
    items = load_task(str(f))
    assert [i["answer"] for i in items] == [1, 0] and items[0]["prompt"] == "Q: Sky colour?\nA: "
    assert len(load_task(str(f), limit=1)) == 1
    (tmp_path / "bad.json").write_text(json.dumps({"subtasks": []}))
    with pytest.raises(InputError, match="no 'examples'"):
        load_task(str(tmp_path / "bad.json"))


@pytest.mark.compile
def test_compiled_static_cache_decode_gives_the_eager_tokens():
    """The compiled fast path (static KV cache + torch.compile'd step) decodes the same greedy tokens."""
    model = tiny_model("llama")
    prompt = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    eager = ev.greedy_decode(model, prompt, 6)
    assert eager.shape == (1, 6)
    assert torch.equal(ev.greedy_decode(model, prompt, 6, compiled=True), eager)
    assert ev.speed(model, prompt_tokens=12, new_tokens=4, repeats=1, compiled=True).decode_tps > 0
