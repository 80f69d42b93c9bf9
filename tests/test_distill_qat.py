"""FakeQuantLinear: forward equals the dequantized RTN weights; the straight-through gradients flow."""

import pytest
import torch
from torch import nn

from lmpress import arch
from lmpress.distill import qat
from lmpress.errors import InputError


def rtn_reference(W, bits, g):
    """Independent asymmetric min-max RTN per group of g columns (range holding 0, fp16 scale)."""
    out = torch.empty_like(W)
    qmax = 2**bits - 1
    for r in range(W.shape[0]):
        for c in range(0, W.shape[1], g):
            w = W[r, c : c + g]
            lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
            s = torch.tensor((hi - lo) / qmax).half().float().item()
            z = min(max(round(-lo / s), 0), qmax)
            q = torch.clamp(torch.round(w / s) + z, 0, qmax)
            out[r, c : c + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits,g", [(2, 8), (4, 16), (3, -1)])
def test_forward_equals_dequantized_rtn(bits, g):
    torch.manual_seed(0)
    W, b = torch.randn(6, 32), torch.randn(6)
    layer = qat.FakeQuantLinear(W, b, bits, g)
    ref = rtn_reference(W, bits, 32 if g == -1 else g)
    assert torch.allclose(layer.dequantized(), ref, atol=1e-6)
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), x @ ref.T + b, atol=1e-5)
    q, s, z = layer.codes()
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    G = s.shape[1]
    assert torch.allclose(((q.float().view(6, G, -1) - z[..., None]) * s[..., None]).view(6, 32), ref, atol=1e-6)
    assert len(set(ref[0, : (32 if g == -1 else g)].tolist())) <= 2**bits


def test_straight_through_gradients():
    torch.manual_seed(0)
    W = torch.randn(4, 16)
    layer = qat.FakeQuantLinear(W, None, 2, 8)
    x = torch.randn(5, 16)
    layer(x).pow(2).sum().backward()
    W_hat = layer.dequantized().detach().requires_grad_(True)
    (x @ W_hat.T).pow(2).sum().backward()
    # min-max grid: every weight lies inside the clipping range, so dL/dW = dL/dW_hat exactly
    assert torch.allclose(layer.weight.grad, W_hat.grad, atol=1e-5)
    # learnable clipping: the ratios get gradients, the clipped weights none
    lc = qat.FakeQuantLinear(W, None, 2, 8, learn_clip=True, clip=torch.full((4, 2), 0.7))
    lc(x).pow(2).sum().backward()
    assert lc.clip_hi.grad.abs().sum() > 0 and lc.clip_lo.grad.abs().sum() > 0
    s, z = lc.params()
    code = torch.round(W.view(4, 2, 8) / s[..., None].detach()) + z[..., None].detach()  # before the clamp
    outside = (code < 0) | (code > 3)
    gw = lc.weight.grad.view(4, 2, 8)
    assert outside.any() and (gw[outside] == 0).all() and (gw[~outside] != 0).any()


def test_mse_clip_init_lowers_weight_error(llama):
    """init_clip="mse" is grid.mse_clip's search taken deeper: per group never worse than RTN's clip search."""
    from lmpress.quant.grid import GridSpec, fake_quantize, grid_params, mse_clip

    name = "model.layers.0.mlp.up_proj"
    W = arch.linear_weight(llama.model.layers[0].mlp.up_proj).detach().clone()  # (128, 64)
    spec = GridSpec(2, 16)
    layer = qat.to_fake_quant_(llama, 2, 16, init_clip="mse")[name]

    def err(s, z):  # (out, G)
        return (fake_quantize(W, s, z, spec) - W).pow(2).view(128, 4, 16).sum(-1)

    init = err(*layer.params())
    assert (init <= err(*mse_clip(W, spec))).all() and init.sum() < 0.9 * err(*grid_params(W, spec)).sum()
    assert layer.clip_lo.min() < 0.75  # 2 bits: the optimum often lies below the RTN search's range


def test_to_fake_quant_model_roundtrip(llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, 8))
    linears = arch.compressible_linears(llama)
    ref = {n: rtn_reference(arch.linear_weight(m).detach(), 4, 16) for n, m in linears.items()}
    layers = qat.to_fake_quant_(llama, bits=4, group_size=16)
    assert set(layers) == set(linears) and len(layers) == 3 * 7
    assert isinstance(llama.lm_head, nn.Linear)  # the head stays float
    w = qat.fake_quant_weights(llama)
    assert all(torch.allclose(w[n], ref[n], atol=1e-6) for n in ref)
    with torch.no_grad():
        out = llama(ids).logits
    assert qat.materialize_fake_quant_(llama) == 21
    assert all(type(m) is nn.Linear for m in arch.compressible_linears(llama).values())
    with torch.no_grad():
        assert torch.allclose(llama(ids).logits, out, atol=1e-5)


def test_gpt2_conv1d_roundtrip():
    from tiny import tiny_model

    m = tiny_model("gpt2")
    ids = torch.randint(3, 256, (1, 6))
    qat.to_fake_quant_(m, bits=8, group_size=16)
    with torch.no_grad():
        out = m(ids).logits
    qat.materialize_fake_quant_(m)
    assert type(m.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, out, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qat_grid_with_clip_1_is_the_rtn_grid(llama, bits):
    """Fake quantization with clip ratios 1 computes exactly RTN's weights, scales and zeros."""
    import copy

    from lmpress.recipe import RunContext, apply, make_config

    rtn = copy.deepcopy(llama)
    apply(rtn, make_config("rtn", bits=bits, group_size=16), RunContext(progress=False))
    layers = qat.to_fake_quant_(llama, bits=bits, group_size=16)
    for n, q in arch.compressible_linears(rtn).items():
        s, z = layers[n].params()
        assert torch.equal(layers[n].dequantized(), q.dequantized()), n
        assert torch.equal(s, q.scales.float()) and torch.equal(z, q.zeros.float()), n


def _train_qat(model, steps=3):
    """A few optimizer steps on random tokens: latent weights and clip ratios move off their init."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        logits = model(ids).logits[:, :-1]
        nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def test_pack_after_qat_computes_the_fake_quantized_forward_bitwise(llama, monkeypatch):
    ids = torch.randint(3, 256, (2, 8))
    layers = qat.to_fake_quant_(llama, bits=2, group_size=16, learn_clip=True, init_clip="mse")
    init_clip = {n: m.clip_hi.detach().clone() for n, m in layers.items()}
    _train_qat(llama)
    assert all(not torch.equal(m.clip_hi, init_clip[n]) for n, m in layers.items())
    W_hat = qat.fake_quant_weights(llama)
    with torch.no_grad():
        out = llama(ids).logits
    assert qat.pack_fake_quant_(llama) == 21
    packed = arch.compressible_linears(llama)
    assert all(type(m).__name__ == "QuantLinear" and torch.equal(m.dequantized(), W_hat[n]) for n, m in packed.items())
    with torch.no_grad():
        assert torch.allclose(llama(ids).logits, out, atol=1e-4)  # the fused kernel sums in another order
        monkeypatch.setenv("LMPRESS_NO_KERNEL", "1")  # the reference path: dequantize, then F.linear
        assert torch.equal(llama(ids).logits, out)


def test_bad_group_size():
    with pytest.raises(InputError, match="does not divide"):
        qat.FakeQuantLinear(torch.randn(4, 30), None, 2, 64)


def test_qat_starts_exactly_at_a_quantized_model(llama):
    """Recipe rtn/gptq -> QAT: fake-quantizing QuantLinear layers with clip 1 keeps their grid."""
    import copy

    from lmpress.recipe import RunContext, apply, make_config

    q = copy.deepcopy(llama)
    apply(q, make_config("rtn", bits=2, group_size=16), RunContext(progress=False))
    before = {n: m.dequantized().clone() for n, m in arch.compressible_linears(q).items()}
    qat.to_fake_quant_(q, 2, 16, init_clip=None)
    for n, m in arch.compressible_linears(q).items():
        assert (m.dequantized() == before[n]).float().mean() > 0.99
