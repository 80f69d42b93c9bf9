"""Bit-packing (lmpress.quant.pack) and the fused CPU kernel (lmpress.quant.kernels)."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from lmpress.quant import kernels
from lmpress.quant.pack import dequantize_packed, pack, packed_shape, unpack

BITS = (2, 3, 4, 8)


def _codes(bits, shape, seed=0):
    """Random codes with both edge values present in the first row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, shape, generator=g)
    q[0, 0], q[0, -1] = 0, 2**bits - 1
    return q


def _quantized(bits, out, cols, group_size, seed=0):
    """(packed, scales, zeros, W) for random codes; W = (q - z) * s computed directly."""
    g = torch.Generator().manual_seed(seed)
    q = _codes(bits, (out, cols), seed)
    s = (torch.rand(out, cols // group_size, generator=g) * 0.05 + 0.001).half()
    z = (torch.rand(out, cols // group_size, generator=g) * (2**bits - 1)).half()
    s_full = s.float().repeat_interleave(group_size, 1)  # (out, in)
    z_full = z.float().repeat_interleave(group_size, 1)
    w = (q.float() - z_full) * s_full
    return pack(q, bits), s, z, w


# ---- pack / unpack --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (33, 256), (7, 200), (2, 1536)])
def test_pack_unpack_roundtrip(bits, shape):
    q = _codes(bits, shape)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == packed_shape(shape, bits) == (shape[0], shape[1] * bits // 8)
    assert torch.equal(unpack(packed, bits, shape).long(), q)


@pytest.mark.parametrize("bits", BITS)
def test_pack_all_max_and_all_zero(bits):
    for value in (0, 2**bits - 1):
        q = torch.full((2, 64), value, dtype=torch.int64)
        assert torch.equal(unpack(pack(q, bits), bits, q.shape).long(), q)


def test_layout_is_the_documented_little_endian_stream():
    # the on-disk format: code k at bit bits * k of its row
    assert pack(torch.tensor([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43]]
    assert pack(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    word = sum(v << (3 * i) for i, v in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]]), 3).tolist() == [
        [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    ]
    assert pack(torch.tensor([[0, 255, 7]]), 8).tolist() == [[0, 255, 7]]


def test_pack_errors_are_clear():
    q = torch.zeros(2, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(q, 5)
    with pytest.raises(ValueError, match=r"lie in \[0, 15\]"):
        pack(q + 16, 4)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\]"):
        pack(q - 1, 2)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(q.float(), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(2, 12, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="multiple of 2"):
        pack(torch.zeros(2, 7, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(16, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="must be uint8 of shape"):
        unpack(torch.zeros(2, 7, dtype=torch.uint8), 4, (2, 16))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, 256])
def test_dequantize_packed_matches_direct(bits, group_size):
    packed, s, z, w = _quantized(bits, 5, 256, group_size)
    got = dequantize_packed(packed, s, z, bits, group_size, (5, 256))
    torch.testing.assert_close(got, w, rtol=0, atol=0)
    bf16 = dequantize_packed(packed, s, z, bits, group_size, (5, 256), torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_dequantize_packed_checks_groups():
    packed, s, z, _ = _quantized(4, 5, 256, 64)
    with pytest.raises(ValueError, match="group_size must divide"):
        dequantize_packed(packed, s, z, 4, 100, (5, 256))
    with pytest.raises(ValueError, match="scales must have shape"):
        dequantize_packed(packed, s[:, :2], z, 4, 64, (5, 256))


# ---- kernels --------------------------------------------------------------------------------


def test_import_compiles_nothing():
    code = (
        "import sys, lmpress.quant.kernels as k; "
        "assert k._build.cache_info().currsize == 0; "
        "assert 'torch.utils.cpp_extension' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_failure_warns_once_with_the_cause(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'lmpress_qgemv':\nq.cpp:3:1: error: boom\n")

    monkeypatch.setattr(cpp, "load", broken)
    with pytest.warns(RuntimeWarning, match="error: boom") as record:
        assert kernels._build.__wrapped__(kernels.EXTENSION_NAME, kernels._SOURCES) is None
    assert len(record) == 1


@pytest.fixture(scope="module")
def kernel():
    """The built extension; skip only when there is no compiler (a broken build fails)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (CXX / c++) on PATH: the fused kernel cannot be built")
    if os.environ.get("LMPRESS_NO_KERNEL", "0") not in ("", "0"):
        pytest.skip("LMPRESS_NO_KERNEL is set")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = kernels.available()  # compiles on first use (~15 s), then loads from the cache
    assert built, f"the C++ kernel failed to build: {[str(w.message) for w in caught]}"
    return kernels


def _reference(monkeypatch, *args, **kwargs):
    monkeypatch.setenv("LMPRESS_NO_KERNEL", "1")
    y = kernels.qmatmul(*args, **kwargs)
    monkeypatch.delenv("LMPRESS_NO_KERNEL")
    return y


def _assert_close_to_reference(y, y_ref):
    # the fused kernel sums in a different order (and folds the zero point per group)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5 * y_ref.abs().max().item())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])  # 256 == in: per-channel
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_reference(kernel, monkeypatch, bits, group_size, rows, with_bias):
    out, cols = 33, 256
    packed, s, z, _ = _quantized(bits, out, cols, group_size, seed=bits + rows)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(out) if with_bias else None
    args = (x, packed, s, z, bits, group_size, out, bias)
    y = kernel.qmatmul(*args)
    assert y.shape == (rows, out)
    _assert_close_to_reference(y, _reference(monkeypatch, *args))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("cols", "group_size"),
    [(96, 8), (96, 24), (200, 200), (104, 104), (640, 64), (576, 64), (576, 576)],
)
def test_kernel_odd_shapes(kernel, monkeypatch, bits, cols, group_size):
    # partial last blocks (576: the half block of SmolLM2's rows), per-channel rows that end
    # mid-lane, group sizes the fast path cannot follow (portable fallback inside the extension)
    if cols % {2: 4, 3: 8, 4: 2, 8: 1}[bits]:
        pytest.skip("shape not packable at this width")
    out = 9
    packed, s, z, w = _quantized(bits, out, cols, group_size)
    fast = kernel.dequantize_fast(packed, s, z, bits, group_size, (out, cols))
    torch.testing.assert_close(fast, w, rtol=0, atol=0)
    for rows in (1, 2, 8):
        x = torch.randn(rows, cols)
        args = (x, packed, s, z, bits, group_size, out)
        _assert_close_to_reference(kernel.qmatmul(*args), _reference(monkeypatch, *args))


def test_kernel_precision_with_offset_activations(kernel):
    # x with a large common offset and an outlier stresses the s * (q.x - z * sum(x)) fold
    packed, s, z, w = _quantized(4, 64, 512, 64)
    x = torch.randn(1, 512) + 20.0
    x[0, 7] = 500.0
    y = kernel.qmatmul(x, packed, s, z, 4, 64, 64)
    exact = (x.double() @ w.double().T).float()
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    assert (y - exact).abs().max().item() < 1e-5 * scale


def test_kernel_float32_scales_and_batched_input(kernel, monkeypatch):
    packed, s, z, _ = _quantized(4, 16, 128, 32)
    s, z = s.float(), z.float()
    x = torch.randn(2, 3, 128)
    y = kernel.qmatmul(x, packed, s, z, 4, 32, 16)
    assert y.shape == (2, 3, 16)
    _assert_close_to_reference(y, _reference(monkeypatch, x, packed, s, z, 4, 32, 16))


def test_gradients_flow_through_the_reference_path(kernel):
    packed, s, z, w = _quantized(4, 8, 64, 32)
    x = torch.randn(1, 64, requires_grad=True)
    kernel.qmatmul(x, packed, s, z, 4, 32, 8).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0, keepdim=True))


def test_fused_row_limit_matches_the_extension(kernel):
    assert kernel._extension().max_rows == kernel.FUSED_MAX_ROWS


def test_qmatmul_checks_shapes():
    packed, s, z, _ = _quantized(4, 8, 64, 32)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="packed weights must be uint8"):
        kernels.qmatmul(x, packed, s, z, 4, 32, 9)
    with pytest.raises(ValueError, match="scales and zeros must have shape"):
        kernels.qmatmul(x, packed, s[:, :1], z, 4, 32, 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        kernels.qmatmul(x, packed, s, z, 5, 32, 8)


def test_reference_path_is_forced_by_env(monkeypatch):
    monkeypatch.setenv("LMPRESS_NO_KERNEL", "1")
    assert kernels.backend_name() == "reference"
    assert not kernels.available()
