"""Width and depth pruning: real surgery, uniform shapes, plain transformers loading."""

import copy

import pytest
import torch
from tiny import tiny_model

from lmpress import arch
from lmpress.errors import InputError
from lmpress.prune import structured as st
from lmpress.recipe import RunContext, apply, make_config
from lmpress.counts import param_counts

IDS = torch.randint(3, 256, (6, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _tok():
    """A real (tiny) fast tokenizer built in-process, so io.load_model finds one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(200)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_width_surgery_keeping_every_unit_gives_identical_logits(kind):
    model = tiny_model(kind)
    ref = _logits(model)
    g = model.config.num_key_value_heads
    n = len(arch.blocks(model))
    plan = st.WidthPlan([torch.arange(g)] * n, [torch.arange(model.config.intermediate_size)] * n,
                        torch.arange(model.config.hidden_size) if kind != "gemma3" else None)
    st.apply_width_plan(model, plan)
    assert torch.equal(_logits(model), ref)
    # and through the method: a target that the full model already meets prunes nothing
    m2 = tiny_model(kind)
    info = apply(m2, make_config("prune-width", target_params=1.0), RunContext(calib=IDS, progress=False))
    assert info["params_after"] == info["params_before"] and torch.equal(_logits(m2), ref)


def test_removed_heads_and_channels_are_gone_and_gqa_groups_stay_whole():
    model = tiny_model("llama")  # 4 query heads, 2 kv heads (2 per group), head_dim 16, MLP 128
    orig = copy.deepcopy(model)
    n = len(arch.blocks(model))
    groups = [torch.tensor([1]), torch.tensor([0]), torch.tensor([1])]
    chans = [torch.arange(0, 128, 2), torch.arange(64), torch.arange(64, 128)]
    st.apply_width_plan(model, st.WidthPlan(groups, chans, None))
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (2, 1, 64)
    for i in range(n):
        b, o = model.model.layers[i], orig.model.layers[i]
        g = groups[i].item()
        q_rows = torch.arange(g * 32, g * 32 + 32)  # query heads 2g, 2g+1 of group g
        kv_rows = torch.arange(g * 16, g * 16 + 16)
        assert b.self_attn.q_proj.weight.shape == (32, 64) and b.self_attn.k_proj.weight.shape == (16, 64)
        assert torch.equal(b.self_attn.q_proj.weight, o.self_attn.q_proj.weight[q_rows])
        assert torch.equal(b.self_attn.k_proj.weight, o.self_attn.k_proj.weight[kv_rows])
        assert torch.equal(b.self_attn.v_proj.weight, o.self_attn.v_proj.weight[kv_rows])
        assert torch.equal(b.self_attn.o_proj.weight, o.self_attn.o_proj.weight[:, q_rows])
        assert torch.equal(b.mlp.up_proj.weight, o.mlp.up_proj.weight[chans[i]])
        assert torch.equal(b.mlp.down_proj.weight, o.mlp.down_proj.weight[:, chans[i]])
    _logits(model)  # runs


def _expected_llama_params(L, D, H, G, hd, I, norms_per_block=2):
    """Non-embedding parameters of a Llama: per block q, k, v, o, gate, up, down and two norms; final norm."""
    return L * (D * H * hd + 2 * D * G * hd + H * hd * D + 3 * D * I + norms_per_block * D) + D


@pytest.mark.parametrize("target,hidden", [(0.75, False), (0.5, False), (0.6, True), (0.75, 0.75)])
def test_width_pruned_param_count_matches_formula(target, hidden):
    model = tiny_model("llama")
    before = st.non_embedding_params(model)
    assert before == _expected_llama_params(3, 64, 4, 2, 16, 128)
    info = apply(model, make_config("prune-width", target_params=target, hidden=hidden), RunContext(calib=IDS, progress=False))
    c = model.config
    expect = _expected_llama_params(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, 16, c.intermediate_size)
    assert st.non_embedding_params(model) == expect == info["params_after"]
    assert expect <= target * before
    assert c.intermediate_size % 8 == 0 and c.num_attention_heads == 2 * c.num_key_value_heads
    if hidden is not True and hidden is not False:  # a fraction: exactly that share of hidden channels is kept
        assert c.hidden_size == 48
    total = param_counts(model).total
    assert total == sum(p.numel() for p in model.parameters())
    assert model.model.embed_tokens.weight.shape == (256, c.hidden_size) and model.lm_head.weight is model.model.embed_tokens.weight
    _logits(model)


@pytest.mark.parametrize("kind,kw", [("llama", {"target_params": 0.6, "hidden": True}), ("qwen2", {"target_params": 0.7}),
                                     ("gemma3", {"target_params": 0.7})])
def test_width_pruned_folder_loads_in_plain_transformers(tmp_path, kind, kw):
    from transformers import AutoModelForCausalLM

    from lmpress.io import load_model, save_model

    model = tiny_model(kind)
    apply(model, make_config("prune-width", **kw), RunContext(calib=IDS, progress=False))
    ref = _logits(model)
    out = save_model(model, tmp_path / "w", tokenizer=_tok())
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(_logits(plain.eval()), ref)
    again, _ = load_model(out)
    assert torch.equal(_logits(again), ref)
    assert st.non_embedding_params(plain) == st.non_embedding_params(model) < st.non_embedding_params(tiny_model(kind))


@pytest.mark.parametrize("importance", st.DEPTH_IMPORTANCE)
def test_depth_pruning_drops_blocks_and_loads_in_plain_transformers(tmp_path, importance):
    from transformers import AutoModelForCausalLM

    from lmpress.io import save_model

    model = tiny_model("gemma3")  # layer_types must follow the kept blocks
    before = st.non_embedding_params(model)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    info = apply(model, make_config("prune-depth", drop_layers=1, importance=importance), RunContext(calib=IDS, progress=False))
    assert len(info["dropped"]) == 1 and len(info["importance"]) == 3
    kept = [i for i in range(3) if i not in info["dropped"]]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert model.config.layer_types == [["sliding_attention", "sliding_attention", "full_attention"][i] for i in kept]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    assert st.non_embedding_params(model) == before - per_block == info["params_after"]
    ref = _logits(model)
    out = save_model(model, tmp_path / "d", tokenizer=_tok())
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(_logits(plain), ref)
    with torch.no_grad():  # generation with a KV cache works on the renumbered blocks
        plain.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)


def test_depth_importance_measures():
    x = torch.randn(2, 5, 8)
    bi, rel = st.block_influence(x, x)
    assert torch.allclose(bi, torch.zeros(10), atol=1e-6) and torch.allclose(rel, torch.zeros(10))
    bi, rel = st.block_influence(x, -x)
    assert torch.allclose(bi, torch.full((10,), 2.0)) and torch.allclose(rel, torch.full((10,), 2.0))


def test_depth_zero_blocks_and_target_params():
    model = tiny_model("llama")
    ref = _logits(model)
    apply(model, make_config("prune-depth", drop_layers=0), RunContext(calib=IDS, progress=False))
    assert torch.equal(_logits(model), ref)
    info = apply(model, make_config("prune-depth", target_params=0.7), RunContext(calib=IDS, progress=False))
    assert len(info["dropped"]) == 1  # keeping 70% of three blocks means dropping one (two kept = 67%)


@pytest.mark.parametrize("method,kw,match", [
    ("prune-width", {"target_params": 0.0}, "target_params"),
    ("prune-width", {"target_params": 1.5}, "target_params"),
    ("prune-width", {"importance": "cosine"}, "importance"),
    ("prune-width", {"heads": False, "mlp": False}, "nothing to prune"),
    ("prune-width", {"hidden": 1.5}, "fraction of hidden channels"),
    ("prune-width", {"hidden": "yes"}, "hidden must be true or false or a number"),
    ("prune-depth", {}, "exactly one"),
    ("prune-depth", {"drop_layers": 2, "target_params": 0.5}, "exactly one"),
    ("prune-depth", {"drop_layers": -1}, "non-negative"),
    ("prune-depth", {"drop_layers": 2, "importance": "magic"}, "importance"),
])
def test_bad_structured_options(method, kw, match):
    with pytest.raises(InputError, match=match):
        make_config(method, **kw)


def test_target_too_small_and_too_many_layers():
    with pytest.raises(InputError, match="too small"):
        apply(tiny_model("llama"), make_config("prune-width", target_params=0.02), RunContext(calib=IDS, progress=False))
    with pytest.raises(InputError, match="leaves none"):
        apply(tiny_model("llama"), make_config("prune-depth", drop_layers=3), RunContext(calib=IDS, progress=False))
    with pytest.raises(InputError, match="width pruning supports"):
        apply(tiny_model("gpt2"), make_config("prune-width"), RunContext(calib=IDS, progress=False))
    with pytest.raises(InputError, match="hidden-channel"):
        apply(tiny_model("gemma3"), make_config("prune-width", hidden=True), RunContext(calib=IDS, progress=False))


def test_compress_api_saves_a_width_pruned_model_plain_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmpress.api import compress
    from lmpress.data import DataConfig
    from lmpress.io import load_model

    (tmp_path / "c.txt").write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 200}" for j in range(40)) for i in range(60)))
    data = DataConfig(corpus=str(tmp_path / "c.txt"), calib_samples=4, calib_len=16, eval_tokens=64)
    model = tiny_model("llama")
    pruned, _ = compress(model, [make_config("prune-width", target_params=0.6)], _tok(), data=data, out=tmp_path / "o",
                         measure=False, progress=False)
    ref = _logits(pruned)
    assert pruned.config.intermediate_size < 128
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()), ref)
    assert torch.equal(_logits(load_model(tmp_path / "o")[0]), ref)
