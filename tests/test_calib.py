import pytest
import torch
from tiny import KINDS, tiny_model

from lmpress import arch, calib


def _final_logits(model, hidden):
    spec = arch.spec_for(model)
    x = model.get_submodule(spec.final_norm)(hidden)
    if getattr(model.config, "model_type", "") == "opt" and model.model.decoder.project_out is not None:
        x = model.model.decoder.project_out(x)
    return model.get_output_embeddings()(x)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_pipeline_reproduces_logits(kind):
    model = tiny_model(kind)
    ids = torch.randint(3, 256, (5, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    last = []
    seen = {}

    def fn(ctx):
        ctx.collect({n: (lambda x, n=n: seen.setdefault((ctx.index, n), 0)) for n in ctx.linears})
        if ctx.index == len(arch.blocks(model)) - 1:
            last.append(torch.cat(ctx.outputs()))

    calib.walk_blocks(model, ids, fn, batch_size=2, progress=False)  # 5 rows: uneven batches
    with torch.no_grad():
        logits = _final_logits(model, last[0])
    if kind == "gemma3" and model.config.final_logit_softcapping:
        cap = model.config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert len(seen) == len(arch.compressible_linears(model))


def test_collect_feeds_linear_inputs_and_changes_propagate(llama):
    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    grams = {}

    def fn(ctx):
        lin = ctx.linears["self_attn.q_proj"]

        def obs(x):  # x: (tokens, in)
            assert x.shape[-1] == lin.in_features
            grams[ctx.index] = grams.get(ctx.index, 0) + x.shape[0]

        ctx.collect({"self_attn.q_proj": obs})
        if ctx.index == 0:  # zero the MLP output of block 0: later blocks must see the change
            with torch.no_grad():
                ctx.linears["mlp.down_proj"].weight.zero_()

    calib.walk_blocks(llama, ids, fn, batch_size=3, progress=False)
    assert grams == {i: 4 * 16 for i in range(3)}
    # The next block's inputs came from the changed block: compare with a full forward of the changed model.
    seen_in = {}
    calib.walk_blocks(llama, ids, lambda c: seen_in.setdefault(c.index, torch.cat(c.inputs)), progress=False)
    with torch.no_grad():
        hs = llama(ids, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(seen_in[1], hs[1])


def test_sequential_groups_follow_shared_inputs(llama):
    groups = {}
    calib.walk_blocks(llama, torch.randint(3, 256, (2, 8)), lambda c: groups.setdefault(c.index, c.groups), progress=False)
    assert groups[0] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_collect_rejects_unknown_layer(llama):
    def fn(ctx):
        ctx.collect({"nope": lambda x: None})

    with pytest.raises(KeyError, match="nope"):
        calib.walk_blocks(llama, torch.randint(3, 256, (2, 8)), fn, progress=False)


def test_inferred_spec_matches_known():
    model = tiny_model("llama")
    spec = arch._infer_spec(model)
    assert spec.blocks == "model.layers" and spec.embed == "model.embed_tokens"


def test_low_precision_passes_track_edits_and_leave_block_in_float(llama):
    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    ref_in, got_in, dtypes = {}, {}, set()
    calib.walk_blocks(llama, ids, lambda c: ref_in.setdefault(c.index, torch.cat(c.inputs)), progress=False)

    def fn(ctx):
        got_in[ctx.index] = torch.cat(ctx.inputs)
        ctx.collect({"mlp.up_proj": lambda x: dtypes.add(x.dtype)})
        assert ctx.linears["mlp.up_proj"].weight.dtype == torch.float32  # the callback edits the float block

    calib.walk_blocks(llama, ids, fn, progress=False, dtype=torch.bfloat16)
    assert dtypes == {torch.bfloat16}
    for i in ref_in:  # bf16 passes stay close to the float ones
        assert got_in[i].dtype == torch.bfloat16
        torch.testing.assert_close(got_in[i].float(), ref_in[i], rtol=0.05, atol=0.05)
    assert all(p.dtype == torch.float32 for p in llama.parameters())

    def zero_mlp(ctx):  # an edit made by the callback reaches the next block's bf16 inputs
        if ctx.index == 0:
            with torch.no_grad():
                ctx.linears["mlp.down_proj"].weight.zero_()
        got_in[ctx.index] = torch.cat(ctx.inputs)

    calib.walk_blocks(llama, ids, zero_mlp, progress=False, dtype=torch.bfloat16)
    with torch.no_grad():
        hs = llama(ids, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(got_in[1].float(), hs[1], rtol=0.05, atol=0.05)


def test_calib_dtype_auto_is_resolved_when_the_config_is_made():
    """``auto`` becomes bfloat16 only where the CPU multiplies bf16 natively; the config (and so the
    saved recipe) holds the resolved value, explicit choices stay."""
    import torch

    import lmpress
    from lmpress.calib import resolve_calib_dtype

    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_calib_dtype("auto") == ("bfloat16" if native else "float32")
    for cls in (lmpress.GPTQConfig, lmpress.WandaConfig, lmpress.SparseGPTConfig):
        assert cls().calib_dtype == resolve_calib_dtype("auto")
        assert cls(calib_dtype="bfloat16").calib_dtype == "bfloat16"
