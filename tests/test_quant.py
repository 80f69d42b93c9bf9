import copy

import pytest
import torch
from tiny import KINDS, tiny_model

from lmpress import arch
from lmpress.errors import InputError
from lmpress.evaluate import compare
from lmpress.quant.gptq import gptq_quantize
from lmpress.quant.grid import GridSpec, dequantize, grid_params, mse_clip, quantize_codes
from lmpress.quant.qlinear import QuantLinear
from lmpress.recipe import RunContext, apply, make_config
from lmpress.stats import InputStats

SPECS = [GridSpec(b, g, sym) for b in (2, 3, 4, 8) for g in (32, -1) for sym in (False, True)] + [GridSpec(2, 32, ternary=True)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_grid_roundtrip_bounds_and_codes(spec):
    w = torch.randn(16, 64)
    s, z = grid_params(w, spec)
    q = quantize_codes(w, s, z, spec)
    assert q.max() <= spec.maxq and q.min() >= 0
    assert torch.equal(s, s.half().float())  # scales are exactly representable in fp16
    deq = dequantize(q, s, z)
    if not spec.ternary:  # inside the range, the error is at most half a step (plus fp rounding)
        g = spec.groups(64)
        step = s.repeat_interleave(g, dim=1)
        lo = (0 - z).repeat_interleave(g, dim=1) * step
        hi = (spec.maxq - z).repeat_interleave(g, dim=1) * step
        inside = (w >= lo) & (w <= hi)
        assert ((deq - w).abs()[inside] <= step[inside] / 2 + 1e-5).all()
    assert torch.equal(quantize_codes(deq, s, z, spec), q)  # grid values are fixed points


def test_group_boundaries_are_independent():
    spec = GridSpec(4, 32)
    w = torch.randn(4, 64)
    w2 = w.clone()
    w2[:, 32:] *= 100  # changing group 2 must not change group 1's scales or codes
    s1, z1 = grid_params(w, spec)
    s2, z2 = grid_params(w2, spec)
    assert torch.equal(s1[:, 0], s2[:, 0]) and torch.equal(
        quantize_codes(w, s1, z1, spec)[:, :32], quantize_codes(w2, s2, z2, spec)[:, :32]
    )


def test_bad_grid_options_are_clear():
    with pytest.raises(InputError, match="does not divide"):
        GridSpec(4, 48).groups(64)
    with pytest.raises(InputError, match="bits"):
        GridSpec(5, 32)
    with pytest.raises(InputError, match="pattern"):
        make_config("rtn", overrides=[{"bits": 8}])


def test_mse_clip_never_worse_than_minmax():
    w = torch.randn(32, 128) * torch.rand(32, 128) ** 4  # heavy tails
    for spec in (GridSpec(3, 32), GridSpec(2, 64)):
        err0 = ((dequantize(quantize_codes(w, *grid_params(w, spec), spec), *grid_params(w, spec)) - w) ** 2).sum()
        s, z = mse_clip(w, spec)
        err1 = ((dequantize(quantize_codes(w, s, z, spec), s, z) - w) ** 2).sum()
        assert err1 <= err0


def _layer_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3
    W = torch.randn(64, 128, generator=g)
    acc = InputStats("xtx", upcast=False)  # GPTQ's Hessian 2/n X^T X
    acc(X)
    return X, W, acc.hessian


@pytest.mark.parametrize("spec", [GridSpec(4, 32), GridSpec(3, 64), GridSpec(2, 32), GridSpec(4, -1), GridSpec(3, 32, sym=True)], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_error_below_rtn(spec, act_order):
    X, W, H = _layer_problem()
    s, z = grid_params(W, spec)
    e_rtn = ((X @ (dequantize(quantize_codes(W, s, z, spec), s, z) - W).T) ** 2).mean()
    q, s2, z2 = gptq_quantize(W, H, spec, act_order=act_order)
    assert q.max() <= spec.maxq
    e_gptq = ((X @ (dequantize(q, s2, z2) - W).T) ** 2).mean()
    assert e_gptq < 0.8 * e_rtn


def test_gptq_rows_are_independent_so_stacked_layers_match_separate_solves():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3, 64)
    H = 2 * X.T @ X / 256
    A, B = torch.randn(24, 64, generator=g), torch.randn(8, 64, generator=g)
    spec = GridSpec(3, 32, False)
    both = gptq_quantize(torch.cat([A, B]), H, spec, act_order=True, clip_search=True)
    for part, rows in ((A, slice(0, 24)), (B, slice(24, 32))):
        one = gptq_quantize(part, H, spec, act_order=True, clip_search=True)
        for x, y in zip(both, one):
            torch.testing.assert_close(x[rows], y, rtol=0, atol=1e-6)


def test_gptq_survives_singular_hessian():
    X, W, _ = _layer_problem()
    X[:, :10] = 0  # dead inputs: zero rows/cols in H
    acc = InputStats("xtx", upcast=False)
    acc(X[:, :])
    q, s, z = gptq_quantize(W, acc.hessian, GridSpec(4, 32))
    assert torch.isfinite(dequantize(q, s, z)).all()


def test_quantlinear_matches_fake_quant():
    w, b = torch.randn(48, 64), torch.randn(48)
    spec = GridSpec(3, 32)
    s, z = grid_params(w, spec)
    q = quantize_codes(w, s, z, spec)
    lin = QuantLinear.from_codes(q, s, z, spec, bias=b)
    x = torch.randn(5, 64)
    torch.testing.assert_close(lin(x), x @ dequantize(q, s, z).T + b, rtol=1e-5, atol=1e-5)
    assert lin.logical_numel() == 48 * 64 + 48


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_on_every_layout_and_gptq_beats_rtn(kind, tmp_path):
    from lmpress.io import save_model
    from lmpress.io import load_model

    base = tiny_model(kind)
    calib = torch.randint(3, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    stream = torch.randint(3, 256, (400,), generator=torch.Generator().manual_seed(1))
    kl = {}
    for method in ("rtn", "gptq", "awq"):
        m = copy.deepcopy(base)
        apply(m, make_config(method, bits=3, group_size=32), RunContext(calib=calib, progress=False))
        assert all(isinstance(l, QuantLinear) for l in arch.compressible_linears(m).values())
        kl[method] = compare(m, base, stream, context=64, bos=1).kl
    assert kl["gptq"] < kl["rtn"]
    # the input model is untouched by methods applied to a copy
    assert all(type(l).__name__ in ("Linear", "Conv1D") for l in arch.compressible_linears(base).values())


def test_save_load_identical_logits_and_overrides(tmp_path):
    from conftest import ByteTokenizer  # noqa: F401  (tokenizer not needed for the weights path)

    from lmpress.formats import native
    from lmpress.io import save_model

    model = tiny_model("llama")
    cfg = make_config("rtn", bits=4, group_size=32, head_bits=8,
                      overrides=[{"pattern": r"layers\.0\.mlp", "bits": 8}, {"pattern": r"layers\.2\.self_attn\.o_proj", "skip": True}])
    apply(model, cfg, RunContext(progress=False))
    lin = arch.compressible_linears(model)
    assert lin["model.layers.0.mlp.up_proj"].bits == 8 and lin["model.layers.1.mlp.up_proj"].bits == 4
    assert isinstance(lin["model.layers.2.self_attn.o_proj"], torch.nn.Linear)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    out = save_model(model, tmp_path / "q", format="lmpress", recipe=[{"method": "rtn"}])
    import json

    info = json.loads((out / "config.json").read_text())["lmpress"]
    assert info["layers"]["model.layers.0.mlp.up_proj"]["bits"] == 8
    again = native.read(out, json.loads((out / "config.json").read_text()))
    ids = torch.randint(3, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    # packed: 4-bit weights take about an eighth of fp32 plus scales
    assert (out / "model.safetensors").stat().st_size < 0.6 * 4 * sum(p.numel() for p in tiny_model("llama").parameters())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_kernel_matches_reference_loop(act_order):
    from lmpress.quant.kernels import gptq_extension

    if gptq_extension() is None:
        pytest.skip("no C++ compiler here: the reference loop is all there is")
    g = torch.Generator().manual_seed(7)
    X = torch.randn(512, 128, generator=g) * torch.linspace(0.1, 4, 128)
    H = 2 * X.T @ X / 512
    W = torch.randn(40, 128, generator=g)
    spec = GridSpec(3, 32, False)
    fast = gptq_quantize(W, H, spec, act_order=act_order, block_size=64)
    ref = gptq_quantize(W, H, spec, act_order=act_order, block_size=64, kernel=False)
    assert (fast[0] == ref[0]).float().mean() > 0.999  # a rounding tie may fall the other way
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-3, atol=1e-6)
    err = [(((dequantize(*r) - W) @ H) * (dequantize(*r) - W)).sum().item() for r in (fast, ref)]
    assert err[0] == pytest.approx(err[1], rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_gram_equals_the_plain_product(dtype):
    from lmpress.stats import gram

    x = torch.randn(300, 70).to(dtype)
    torch.testing.assert_close(gram(x, min_split=16), (x.T @ x).float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)
    assert torch.equal(gram(x), (x.T @ x).float())


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("split", [16, 1024])
def test_gram_added_in_place_has_the_bits_of_adding_the_product(acc_dtype, split):
    """InputStats sums X^T X batch by batch in place: the same bits as adding each batch's product."""
    from lmpress.stats import InputStats, gram

    x, acc = torch.randn(300, 70), torch.randn(70, 70).to(acc_dtype)
    want = acc.clone().add_(gram(x, min_split=split).to(acc_dtype))
    got = gram(x, min_split=split, add_to=acc)
    assert got is acc and torch.equal(got, want)
    st = InputStats("xtx", dtype=acc_dtype)
    for xb in x.split(64):
        st(xb)
    ref = sum((gram(xb).to(acc_dtype) for xb in x.split(64)[1:]), gram(x.split(64)[0]).to(acc_dtype))
    assert torch.equal(st.xtx, ref)


@pytest.mark.parametrize("bits, group, sym", [(4, 64, False), (3, -1, True), (2, 128, False)])
@pytest.mark.parametrize("clip", [True, False])
def test_gptq_grid_params_by_row_slices_equal_the_whole(bits, group, sym, clip):
    from lmpress.quant.gptq import _params_by_rows
    from lmpress.quant.grid import GridSpec, choose_params

    W = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    a, b = _params_by_rows(W, GridSpec(bits, group, sym), clip, rows=77), choose_params(W, GridSpec(bits, group, sym), clip)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
