"""llama.cpp block types: bytes as ggml lays them out, values as gguf reads them, codes nearest on the grid."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as G  # noqa: E402

from lmpress.errors import InputError  # noqa: E402
from lmpress.quant import ggml  # noqa: E402

LEGACY_WITH_REFERENCE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # types gguf.quants.quantize implements


def _weight(seed=0, rows=6, cols=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0  # an all-zero block: scale 0
    w[1, :256] = w[1, :256].abs()  # a positive super-block: the min is clipped to 0
    w[2, 5] = 1.0  # an outlier
    return w


@pytest.mark.parametrize("gtype", LEGACY_WITH_REFERENCE)
def test_reference_mode_bit_for_bit_with_gguf_quantize(gtype):
    w = _weight()
    ref = gguf.quants.quantize(w.numpy(), G[gtype])
    ours = ggml.encode(ggml.quantize(w, gtype, reference=True))
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("gtype", list(ggml.TYPES))
def test_gguf_reads_back_our_grid_values_exactly(gtype):
    w = _weight(1)
    bq = ggml.quantize(w, gtype)
    raw = ggml.encode(bq)
    assert np.array_equal(gguf.quants.dequantize(raw, G[gtype]), ggml.dequantize(bq).numpy())


@pytest.mark.parametrize("gtype", list(ggml.TYPES))
def test_codes_are_nearest_on_the_stored_grid(gtype):
    """Each weight's value is (up to float rounding of ties) the closest of its sub-block's levels."""
    w = _weight(2)
    bq = ggml.quantize(w, gtype)
    t = bq.type
    S, M = bq.scale_offset()  # (out, B, n_sub, 1)
    cand = S[..., None] * ggml.levels(t) + (0 if M is None else M[..., None])  # (out, B, n_sub, 1, L)
    x = w.reshape(*S.shape[:3], t.sub)[..., None]  # (out, B, n_sub, sub, 1)
    best = (cand - x).abs().amin(-1)
    ours = (ggml.dequantize(bq).reshape(x.shape[:-1]) - x[..., 0]).abs()
    assert (ours <= best + 1e-6 * (S.abs()[..., 0] + 1e-12)[..., None]).all()
    if t.k_type:
        assert bq.d.to(torch.float16).float().equal(bq.d)  # stored precision before the codes
    assert bq.q.max() <= t.maxq


@pytest.mark.parametrize("gtype,bound", [("Q8_0", 0.01), ("Q6_K", 0.03), ("Q5_0", 0.06), ("Q5_K", 0.06),
                                         ("Q4_0", 0.12), ("Q4_K", 0.12), ("IQ4_NL", 0.12), ("Q3_K", 0.25)])
def test_error_falls_with_bits(gtype, bound):
    w = torch.randn(16, 1024, generator=torch.Generator().manual_seed(3))
    err = (ggml.dequantize(ggml.quantize(w, gtype)) - w).abs().mean() / w.abs().mean()
    assert err < bound


def test_default_mode_differs_from_reference_only_by_one_step():
    w = _weight(4)
    a, b = ggml.quantize(w, "Q4_1"), ggml.quantize(w, "Q4_1", reference=True)
    assert a.d.equal(b.d) and a.m.equal(b.m)
    assert (a.q.int() - b.q.int()).abs().max() <= 1


def test_fallback_rule_of_llama_quant():
    assert ggml.fallback_type("Q4_K", 4096) == "Q4_K"
    assert ggml.fallback_type("Q4_K", 576 + 32) == "Q5_0"
    assert ggml.fallback_type("Q5_K", 96) == "Q5_1"
    assert ggml.fallback_type("Q6_K", 96) == "Q8_0"
    assert ggml.fallback_type("Q3_K", 96) == "Q4_0" and ggml.fallback_type("Q2_K", 96) == "Q4_0"
    assert ggml.fallback_type("IQ4_XS", 96) == "IQ4_NL"
    assert ggml.fallback_type("Q4_K", 100) == "F16" and ggml.fallback_type("Q8_0", 100) == "F16"


def test_bad_row_length_names_the_fallback():
    with pytest.raises(InputError, match="Q5_0"):
        ggml.quantize(torch.randn(4, 96), "Q4_K")
    with pytest.raises(InputError, match="unknown GGUF block type"):
        ggml.quantize(torch.randn(4, 256), "Q7_K")
    with pytest.raises(InputError, match="reference"):
        ggml.quantize(torch.randn(4, 256), "Q4_K", reference=True)
