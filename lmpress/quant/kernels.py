"""Fast CPU matmul with bit-packed weight-only quantized weights (layout: :mod:`.pack`).

``qmatmul(x, packed, scales, zeros, bits, group_size, out_features)`` computes
``x @ W.T (+ bias)`` with ``W = (q - z) * s``:

* up to :data:`FUSED_MAX_ROWS` rows of ``x`` (decode): a fused C++ kernel
  (``lmpress/csrc/qgemv.cpp``) reads the packed weights once, in order, and dequantizes them in
  registers, so batch-1 decode runs near memory speed on ~4.5 instead of 32 bits per weight;
* more rows (prefill): the C++ kernel dequantizes to a float32 matrix and ``F.linear`` multiplies.

The products run as PyTorch operators, ``torch.ops.lmpress.qmatmul`` and ``qmatmul_many`` (several
matrices that read the same x, one call; see :mod:`.fuse`), with fake implementations, so
``torch.compile(fullgraph=True)`` traces a quantized model without graph breaks. The kernels use
AVX-512 VBMI or AVX2 + FMA + F16C when the CPU has them (:func:`backend_name`).

The extension is compiled on first use (never at import) by :func:`lmpress.cext.load_extension`
as ``lmpress_qgemv_<digest of the sources and flags>`` and cached in ``~/.cache/lmpress/ext`` (see
there); the first call takes ~15 s (two translation units, compiled in parallel).
If it cannot be built, one warning names the cause and every call uses the reference path
(:func:`lmpress.quant.pack.dequantize_packed` then ``F.linear``). ``LMPRESS_NO_KERNEL=1`` forces the
reference path. Inputs the kernel does not cover (x not float32, scales neither float16 nor float32,
a gradient to track: the kernel has no backward) also take the reference path.

Example::

    y = qmatmul(x, pack(q, 4), s, z, bits=4, group_size=64, out_features=q.shape[0])
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .grid import BITS
from .pack import dequantize_packed

EXTENSION_NAME = "lmpress_qgemv"
FUSED_MAX_ROWS = 8  # = kMaxRows in qgemv_kernel.cpp: fused up to here, then dequantize + matmul
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("qgemv.cpp", "qgemv_kernel.cpp")  # glue, kernels (compiled in parallel)
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_KERNEL_DTYPES = (torch.float16, torch.float32)  # scale / zero dtypes the kernel reads


def qmatmul(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    out_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """``x (..., in) @ W.T + bias -> (..., out)``, ``W = (q - z) * s`` stored by ``pack(q, bits)``."""
    if torch.compiler.is_compiling():  # traced: the operator, one graph node
        if _kernel_applies(x, scales, bias):
            return torch.ops.lmpress.qmatmul.default(x, packed, scales, zeros, bits, group_size, out_features, bias)
        return reference_qmatmul(x, packed, scales, zeros, bits, group_size, out_features, bias)
    ext = None if reference_forced() else _extension()
    if ext is not None:  # eager: the pybind entry (a few microseconds cheaper than the dispatcher; ~200 calls a token)
        try:  # validated in C++; None when the kernel does not cover the inputs (dtype, gradient)
            y = ext.qmatmul(x, packed, scales, zeros, bits, group_size, out_features, bias)
        except RuntimeError:
            _check(packed, scales, zeros, bits, group_size, out_features, x.shape[-1])
            raise
        if y is not None:
            return y
    return reference_qmatmul(x, packed, scales, zeros, bits, group_size, out_features, bias)


def reference_qmatmul(x, packed, scales, zeros, bits, group_size, out_features, bias=None) -> Tensor:
    """The plain path: :func:`.pack.dequantize_packed` then ``F.linear`` (traceable, differentiable)."""
    _check(packed, scales, zeros, bits, group_size, out_features, x.shape[-1])
    w = dequantize_packed(packed, scales, zeros, bits, group_size, (out_features, x.shape[-1]), x.dtype)
    return F.linear(x, w, bias)


def _kernel_applies(x: Tensor, scales: Tensor, bias: Tensor | None) -> bool:
    """Whether ``lmpress::qmatmul`` computes this call: the extension is built and allowed, x is a
    non-empty float32 CPU tensor, scales are float16 / float32, and no gradient is to be tracked
    (the kernel has no backward)."""
    if not kernel_ready() or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0:
        return False
    if scales.dtype not in _KERNEL_DTYPES or (bias is not None and bias.dtype != torch.float32):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))


@torch.compiler.assume_constant_result
def kernel_ready() -> bool:
    """:func:`available`, read once per compiled graph by ``torch.compile`` (a constant there: set
    ``LMPRESS_NO_KERNEL`` before the first compiled call)."""
    return available()


def dequantize_fast(
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    shape: tuple[int, int],
) -> Tensor:
    """Same float32 matrix as :func:`.pack.dequantize_packed` (bit for bit), via C++ when built."""
    out, cols = (int(d) for d in shape)
    _check(packed, scales, zeros, bits, group_size, out, cols)
    ext = None if reference_forced() else _extension()
    if ext is None or scales.dtype != zeros.dtype or scales.dtype not in _KERNEL_DTYPES:
        return dequantize_packed(packed, scales, zeros, bits, group_size, (out, cols))
    return ext.dequant(
        packed.contiguous(), scales.contiguous(), zeros.contiguous(), bits, group_size, cols
    )


def available() -> bool:
    """Whether the C++ kernel is built (compiles it on the first call) and not disabled."""
    return not reference_forced() and _extension() is not None


def backend_name() -> str:
    """``"cpp-avx512-vbmi"``, ``"cpp-avx2"``, ``"cpp-portable"`` or ``"reference"`` (compiles on the first call)."""
    return f"cpp-{_extension().simd()}" if available() else "reference"


def reference_forced() -> bool:
    """``LMPRESS_NO_KERNEL`` set to anything but empty or ``0``."""
    return os.environ.get("LMPRESS_NO_KERNEL", "0") not in ("", "0")


def _check(packed, scales, zeros, bits, group_size, out, cols) -> None:
    """Cheap shape checks (this runs on every decode step, so no data is read)."""
    if bits not in BITS:
        raise InputError(f"bits must be one of {BITS}; got {bits!r}")
    if cols * bits % 8:
        raise InputError(f"in_features * bits must be a multiple of 8; got {cols} * {bits}")
    if packed.dtype != torch.uint8 or packed.shape != (out, cols * bits // 8):
        raise InputError(
            f"packed weights must be uint8 of shape (out, in * bits // 8) = "
            f"{(out, cols * bits // 8)}; got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if group_size <= 0 or cols % group_size:
        raise InputError(f"group_size must divide in_features={cols}; got {group_size}")
    if scales.shape != (out, cols // group_size) or zeros.shape != scales.shape:
        raise InputError(
            f"scales and zeros must have shape (out, in // group_size) = "
            f"{(out, cols // group_size)}; got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )


def _extension():
    """The qgemv extension (built on the first call, its operators registered with their fake
    implementations), or None when it cannot be built."""
    ext = _build(EXTENSION_NAME, _SOURCES)
    if ext is not None:
        _register_fakes()
    return ext


@functools.cache
def _register_fakes() -> None:
    """Shape-only implementations of ``lmpress::qmatmul`` / ``qmatmul_many`` for torch.compile."""

    @torch.library.register_fake("lmpress::qmatmul")
    def _(x, packed, scales, zeros, bits, group_size, out_features, bias):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("lmpress::qmatmul_many")
    def _(x, packed, scales, zeros, bits, group_size, out_features, bias):
        return [x.new_empty((*x.shape[:-1], n)) for n in out_features]


def gptq_extension():
    """The GPTQ column-loop extension (``lmpress/csrc/gptq_block.cpp``), or None when it cannot be
    built or ``LMPRESS_NO_KERNEL`` is set (GPTQ then runs its Python reference loop)."""
    return None if reference_forced() else _build("lmpress_gptq", ("gptq_block.cpp",))


@functools.cache
def _build(name: str, sources: tuple[str, ...]):
    """Build (or load from the cache) a C++ extension; on failure warn once and return None."""
    try:
        from ..cext import load_extension

        cflags = [*_FLAGS, f"-DLMPRESS_CPU={_cpu_tag()}"]
        return load_extension(name, [_CSRC / src for src in sources], cflags, ["-fopenmp"])
    except Exception as exc:  # any build or load failure: fall back, loudly
        warnings.warn(
            f"lmpress: could not build the {name} C++ kernel ({_cause(exc)}); "
            "lmpress uses its slower reference path instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _cpu_tag() -> str:
    """A hash of this CPU's feature flags: part of the build flags, so that a cached
    -march=native build is never loaded on a CPU it was not built for (torch rebuilds instead)."""
    import hashlib
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1((flags or platform.processor()).encode()).hexdigest()[:12]


def _cause(exc: Exception) -> str:
    """The first compiler 'error' line of a build failure, else the exception's first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.lower().startswith("error building extension"):
            return ln[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]
