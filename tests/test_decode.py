"""The packed kernels as PyTorch operators: lmpress::qmatmul / qmatmul_many, their fake
implementations, the shared-input fusion pass, and torch.compile of quantized models."""

import importlib

import pytest
import torch
from test_pack import _quantized, kernel  # noqa: F401  (the fixture)

from lmpress.quant import fuse
from lmpress.quant.grid import BITS
from lmpress.quant.rtn import RTNConfig, rtn_

ev = importlib.import_module("lmpress.evaluate")  # the module (lmpress.evaluate is the API function)
from tiny import tiny_model

# (out_features of the matrices that share x): q/k/v-like and gate/up-like groups
GROUPS = [(48, 16, 16), (40, 40)]


def _group(bits, group_size, cols, outs, bias: bool):
    mats = [_quantized(bits, n, cols, group_size, seed=i)[:3] for i, n in enumerate(outs)]
    biases = [torch.randn(n) if bias else None for n in outs]
    return mats, biases


@pytest.mark.cext
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("outs", GROUPS)
@pytest.mark.parametrize("rows", [1, 3, 17])  # 17: past the fused row limit (dequantize + matmul)
def test_qmatmul_many_equals_one_call_per_matrix(kernel, bits, outs, rows):
    cols, group_size = 192, 64
    mats, biases = _group(bits, group_size, cols, outs, bias=rows == 3)
    x = torch.randn(1, rows, cols)
    many = torch.ops.lmpress.qmatmul_many(x, [m[0] for m in mats], [m[1] for m in mats], [m[2] for m in mats],
                                          bits, group_size, list(outs), biases)
    for (packed, s, z), b, n, y in zip(mats, biases, outs, many):
        assert y.shape == (1, rows, n)
        assert torch.equal(y, kernel.qmatmul(x, packed, s, z, bits, group_size, n, b))  # bit for bit


@pytest.mark.cext
def test_qmatmul_op_converts_what_the_kernel_does_not_cover(kernel, monkeypatch):
    packed, s, z, w = _quantized(4, 8, 64, 32)
    x = torch.randn(2, 64, dtype=torch.float64)
    y = torch.ops.lmpress.qmatmul(x, packed, s.double(), z.double(), 4, 32, 8, None)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x @ w.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.cext
def test_fake_implementations_give_shapes_without_data(kernel):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mats, biases = _group(4, 64, 192, (48, 16), bias=False)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(1, 5, 192))
        fm = [[mode.from_tensor(t) for t in m] for m in mats]
        y = torch.ops.lmpress.qmatmul(x, *fm[0], 4, 64, 48, None)
        ys = torch.ops.lmpress.qmatmul_many(x, [m[0] for m in fm], [m[1] for m in fm], [m[2] for m in fm],
                                            4, 64, [48, 16], biases)
    assert y.shape == (1, 5, 48) and [t.shape for t in ys] == [(1, 5, 48), (1, 5, 16)]


@pytest.mark.cext
def test_fusion_pass_groups_products_of_one_input(kernel):
    from torch.fx.experimental.proxy_tensor import make_fx

    mats, _ = _group(4, 64, 192, (48, 16, 16), bias=False)
    weights = [t for m in (*mats, _quantized(4, 48, 80, 16, seed=9)[:3]) for t in m]

    def block(x, *w):  # three products of x, one of another input: one group of three
        q, k, v, o = (w[i : i + 3] for i in range(0, 12, 3))
        a, b, c = (torch.ops.lmpress.qmatmul(x, *m, 4, 64, m[0].shape[0], None) for m in (q, k, v))
        return torch.ops.lmpress.qmatmul(torch.cat([a, b, c], -1), *o, 4, 16, 48, None)  # (1, 1, 80) in

    x = torch.randn(1, 1, 192)
    gm = make_fx(block, tracing_mode="fake")(x, *weights)
    fuse.FuseSharedInputs()(gm.graph)
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.lmpress.qmatmul_many.default) == 1
    assert targets.count(torch.ops.lmpress.qmatmul.default) == 1  # o: its input is shared by no one
    assert torch.equal(gm(x, *weights), block(x, *weights))


def _quantized_tiny(bits: int, group_size: int, head_bits=None):
    model = tiny_model("llama")
    rtn_(model, RTNConfig(bits=bits, group_size=group_size, head_bits=head_bits))
    return model


CONFIGS = [(4, 64, 8), (3, 64, None), (8, -1, None)]  # W4 g64 + 8-bit head, W3 g64, W8 per channel


@pytest.mark.compile
@pytest.mark.parametrize(("bits", "group_size", "head_bits"), CONFIGS)
def test_quantized_model_compiles_without_graph_breaks(bits, group_size, head_bits):
    """fullgraph=True fails on any graph break; the compiled logits are the eager ones."""
    model = _quantized_tiny(bits, group_size, head_bits)
    step = torch.compile(model.forward, fullgraph=True, options=fuse.compile_options())
    with torch.inference_mode():
        for length in (1, 5, 12):  # decode rows and a prefill past the fused row limit
            ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(length))
            torch.testing.assert_close(step(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.compile
def test_reference_path_compiles_too(monkeypatch):
    monkeypatch.setenv("LMPRESS_NO_KERNEL", "1")
    model = _quantized_tiny(4, 64)
    step = torch.compile(model.forward, fullgraph=True, options=fuse.compile_options())
    ids = torch.randint(3, 256, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(step(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.compile
def test_compiled_decode_of_a_quantized_model_gives_the_eager_tokens():
    model = _quantized_tiny(4, 64, head_bits=8)
    prompt = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    eager = ev.greedy_decode(model, prompt, 6)
    assert torch.equal(ev.greedy_decode(model, prompt, 6, compiled=True), eager)
    assert torch.equal(ev._timed_decode(model, prompt, 6, True, warm=True)[0], eager)  # differentiating guards only


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_grouped_sdpa_gives_the_sdpa_logits(kind):
    from lmpress.attention import use_grouped_sdpa_

    model = tiny_model(kind)
    prompt = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.set_attn_implementation("eager")  # the reference: key/value heads repeated, plain softmax
        out = model(prompt[:, :8], use_cache=True)
        ref = model(prompt[:, 8:], past_key_values=out.past_key_values, use_cache=True).logits
        model.set_attn_implementation("sdpa")
        assert use_grouped_sdpa_(model) and model.config._attn_implementation == "lmpress_sdpa"
        out2 = model(prompt[:, :8], use_cache=True)
        got = model(prompt[:, 8:], past_key_values=out2.past_key_values, use_cache=True).logits
    torch.testing.assert_close(out2.logits, out.logits, rtol=1e-5, atol=1e-5)  # prefill: transformers' SDPA
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # one token: the packed query heads
