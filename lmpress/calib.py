"""The calibration pipeline: run a model block by block over calibration inputs.

Written once, used by every layer-wise method (GPTQ, AWQ, Wanda, SparseGPT, activation-aware SVD):

1. One forward of a single sample records the keyword arguments each decoder block receives
   (attention mask, rotary embeddings, ...) and the inputs of the first block are captured for all
   samples by stopping the model at block 0.
2. For each block in turn, the method's callback gets a :class:`BlockContext`. It may run the block
   over all calibration inputs with hooks that hand each linear layer's inputs to a per-layer
   accumulator (:meth:`BlockContext.collect`), as often as it needs (true-sequential methods do it
   once per group of linears), and it may change the block.
3. The pipeline then runs the *changed* block to produce the inputs of the next block.

Only one block's inputs and outputs live at once, so peak memory is about the model's weights plus
two sets of hidden states, (n, L, hidden) each.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import arch


CALIB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # a method's ``calib_dtype`` field


def check_calib_dtype(name: str) -> None:
    if name not in CALIB_DTYPES and name != "auto":
        raise ValueError(f"calib_dtype {name!r} must be one of {sorted(CALIB_DTYPES)} or auto")


def resolve_calib_dtype(name: str) -> str:
    """``auto``: bfloat16 where this CPU multiplies bfloat16 natively (AVX512-BF16 / AMX), else
    float32. ``python bench/bf16_matmul.py`` on an idle AVX2-only CPU: a bfloat16 (8192 x 576) @
    (576 x 1536) product ran at 1.2 GFLOP/s against 89 GFLOP/s in float32, so a bfloat16 default made
    calibration tens of times slower there; on CPUs with bf16 units bfloat16 passes are ~3x faster."""
    check_calib_dtype(name)
    if name != "auto":
        return name
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


class _Stop(Exception):
    pass


@dataclass
class BlockContext:
    """One decoder block and its calibration inputs, as handed to a method's callback."""

    index: int
    name: str  # full module path, e.g. "model.layers.3"
    block: nn.Module
    inputs: list[torch.Tensor]  # hidden states, one (b, L, hidden) tensor per batch
    extra: tuple[tuple, dict]  # the block's other forward arguments (batch dim 1, broadcast)
    dtype: torch.dtype | None = None  # run the block's passes in this dtype (None: the block's own)
    _groups: list[list[str]] | None = field(default=None, repr=False)
    _deferred: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the next block's inputs are computed (e.g. swap in packed layers, whose
        forward is slower than the float layer holding the same dequantized weights)."""
        self._deferred.append(fn)

    @property
    def linears(self) -> dict[str, nn.Module]:
        return arch.block_linears(self.block)

    @property
    def groups(self) -> list[list[str]]:
        """Linears in execution order, grouped when they read the same input (q/k/v, gate/up)."""
        if self._groups is None:
            self._groups = _execution_groups(self)
        return self._groups

    def runner(self) -> nn.Module:
        """The module the passes run: the block itself, or a copy of its current state in ``dtype``
        (made afresh each pass, so it always carries the method's latest changes)."""
        if self.dtype is None:
            return self.block
        return copy.deepcopy(self.block).to(self.dtype)

    def forward(self, x: torch.Tensor, block: nn.Module | None = None) -> torch.Tensor:
        args, kwargs = self.extra
        out = (block if block is not None else self.block)(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def collect(self, observers: dict[str, Callable[[torch.Tensor], None]]) -> None:
        """Run the block over every input batch; call ``observers[name](x)`` with each named linear's
        input, flattened to (tokens, in_features). Stops each pass once the last observed linear ran.
        """
        runner = self.runner()
        mods = arch.block_linears(runner)
        unknown = set(observers) - set(mods)
        if unknown:
            raise KeyError(f"block {self.name} has no linear layers {sorted(unknown)}")
        pending: set[str] = set()

        def make_hook(name):
            def hook(_m, args):
                x = args[0]
                observers[name](x.reshape(-1, x.shape[-1]))
                pending.discard(name)
                if not pending:
                    raise _Stop

            return hook

        handles = [mods[n].register_forward_pre_hook(make_hook(n)) for n in observers]
        try:
            with torch.no_grad():
                for x in self.inputs:
                    pending.update(observers)
                    try:
                        self.forward(x, runner)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()

    def outputs(self) -> list[torch.Tensor]:
        runner = self.runner()
        with torch.no_grad():
            return [self.forward(x, runner) for x in self.inputs]


def _execution_groups(ctx: BlockContext) -> list[list[str]]:
    calls: list[tuple[str, torch.Tensor]] = []  # keeps inputs alive so identity checks are sound
    runner = ctx.runner()
    names = {m: n for n, m in arch.block_linears(runner).items()}

    def hook(m, args):
        calls.append((names[m], args[0]))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    try:
        with torch.no_grad():
            ctx.forward(ctx.inputs[0][:1], runner)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    prev = None
    for name, inp in calls:
        if any(name in g for g in groups):
            continue
        if groups and inp is prev:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = inp
    return groups


def capture(model: nn.Module, calib: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[tuple]]:
    """Inputs of block 0 for all samples, batched, and each block's other arguments. calib: (n, L)"""
    blocks = arch.blocks(model)
    extras: list[tuple] = [((), {}) for _ in blocks]
    inputs: list[torch.Tensor] = []

    def record(i):
        def hook(_m, args, kw):
            if "hidden_states" in kw:
                raise NotImplementedError("blocks called with hidden_states as a keyword are not supported")
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "cache")}
            extras[i] = (tuple(args[1:]), kw)

        return hook

    def stop(_m, args, kw):
        inputs.append(args[0].detach())
        raise _Stop

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        try:
            model(calib[:1], use_cache=False)  # kwargs of every block, batch dim 1
        finally:
            for h in handles:
                h.remove()
        h = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for s in range(0, calib.shape[0], batch_size):
                try:
                    model(calib[s : s + batch_size], use_cache=False)
                except _Stop:
                    pass
        finally:
            h.remove()
    return inputs, extras


def walk_blocks(
    model: nn.Module,
    calib: torch.Tensor,
    fn: Callable[[BlockContext], None],
    *,
    batch_size: int = 8,
    progress: bool | str = True,
    blocks_to_visit: Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Call ``fn`` on each decoder block in order, feeding each block the outputs of the changed
    previous block. ``calib`` is (n, L) token ids. ``progress`` is a bool or a bar label.

    ``dtype`` (e.g. ``torch.bfloat16``): run every block pass on a copy of the block in that dtype,
    with hidden states kept in it; the callback still sees and edits the block at its own precision.
    About 3x faster on CPUs with bf16 matrix units; observers then receive bf16 inputs.
    """
    from .progress import bar

    spec = arch.spec_for(model)
    blocks = arch.blocks(model)
    inputs, extras = capture(model, calib, batch_size)
    if dtype is not None:
        inputs = [x.to(dtype) for x in inputs]
        extras = [_cast(e, dtype) for e in extras]
    visit = set(range(len(blocks)) if blocks_to_visit is None else blocks_to_visit)
    label = progress if isinstance(progress, str) else "blocks"
    for i in bar(range(len(blocks)), desc=label, enabled=bool(progress)):
        ctx = BlockContext(i, f"{spec.blocks}.{i}", blocks[i], inputs, extras[i], dtype)
        if i in visit:
            fn(ctx)
        if i + 1 < len(blocks):
            inputs = ctx.outputs()
        for fn_done in ctx._deferred:
            fn_done()
        del ctx


def _cast(obj, dtype: torch.dtype):
    """``obj`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(_cast(o, dtype) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj
