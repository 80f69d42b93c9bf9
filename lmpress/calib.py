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

The outputs replace the inputs batch by batch, so peak memory is about the model's weights plus one
set of hidden states (n, L, hidden) and one batch. A streamed model (:mod:`lmpress.stream`) holds
only the block being worked on: its :class:`BlockSource` materialises each block before its turn
and writes and frees it after. Under torch.distributed (``torchrun``) each rank runs its share of
the calibration rows, the statistics are summed over ranks, and the layers' solves are spread over
ranks (:meth:`BlockContext.solve_spread`), so every rank holds the same changed block.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from . import arch


# rows per batch of a block pass: a pass's transient activations (attention scores, the MLP's wide
# intermediates) grow with it, while 2 x 512 tokens already fill the matrix products. Streamed GPTQ
# of the default model with 128 x 512 tokens peaks at 0.73 GiB with 2 against 0.83 GiB with 8
# (bench/profile_stream_memory.py --blocks 6 --threads 2). The batches fix the summation order of the
# statistics, so the in-memory and streamed paths use the same ones.
PASS_BATCH = 2
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
    rank: int = 0  # this process in a torch.distributed group (see walk_blocks)
    world: int = 1
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
        (made afresh each pass, so it always carries the method's latest changes). A block already
        in ``dtype`` runs itself: a copy would hold the same values (float32 passes of a float32
        block: 187 MB less per pass for a Qwen2-1.5B block)."""
        floats = [t for t in list(self.block.parameters()) + list(self.block.buffers()) if t.is_floating_point()]
        if self.dtype is None or all(t.dtype == self.dtype for t in floats):
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

    def advance(self) -> None:
        """Replace each input batch by the block's output, in place: only one batch of outputs
        exists besides the inputs at any time."""
        runner = self.runner()
        with torch.no_grad():
            for k, x in enumerate(self.inputs):
                self.inputs[k] = self.forward(x, runner)

    def solve_spread(self, jobs: list[Callable[[], object]], costs: list[float]) -> list[object]:
        """Run ``jobs`` (independent solves of this block's layers) and return their results in
        order. Under torch.distributed each job runs on one rank (the longest first, each to the
        least loaded rank) and its result is broadcast, so every rank holds the same results."""
        if self.world == 1:
            return [job() for job in jobs]
        import torch.distributed as dist

        owner = _deal(costs, self.world)
        mine = {k: job() for k, job in enumerate(jobs) if owner[k] == self.rank}
        out = []
        for k in range(len(jobs)):
            box = [mine.get(k)]
            dist.broadcast_object_list(box, src=owner[k])
            out.append(box[0])
        return out


def _deal(costs: list[float], world: int) -> list[int]:
    """The rank of each job: longest first, each to the least loaded rank (ties: the lowest rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[k], load[r] = r, load[r] + costs[k]
    return owner


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
    extras = record_extras(model, calib[:1])
    return first_inputs(model, calib, batch_size), extras


def record_extras(model: nn.Module, sample: torch.Tensor) -> list[tuple]:
    """Each block's forward arguments besides the hidden states (attention mask, rotary embeddings,
    ...), from one pass over ``sample`` (1, L) in which every block passes its input through
    unchanged: the model computes these arguments outside its blocks, so no block weight is needed
    (a streamed model's blocks may still be on the meta device)."""
    blocks = arch.blocks(model)
    extras: list[tuple] = [((), {}) for _ in blocks]

    def passthrough(i):
        def forward(*args, **kw):
            if "hidden_states" in kw:
                raise NotImplementedError("blocks called with hidden_states as a keyword are not supported")
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "cache")}
            extras[i] = (tuple(args[1:]), kw)
            if i == len(blocks) - 1:
                raise _Stop  # nothing after the last block is needed
            return args[0]

        return forward

    for i, b in enumerate(blocks):
        b.forward = passthrough(i)  # an instance attribute: hooks and attributes stay in place
    try:
        with torch.no_grad():
            model(sample, use_cache=False)
    except _Stop:
        pass
    finally:
        for b in blocks:
            del b.forward
    return extras


def first_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The hidden states entering block 0 for all samples, one tensor per batch. calib: (n, L)"""
    inputs: list[torch.Tensor] = []

    def stop(_m, args, kw):
        inputs.append(args[0].detach())
        raise _Stop

    h = arch.blocks(model)[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, calib.shape[0], batch_size):
                try:
                    model(calib[s : s + batch_size], use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
    return inputs


class BlockSource(Protocol):
    """Where a streamed model's blocks come from (:mod:`lmpress.stream`): set as the model's
    ``lmpress_blocks`` attribute, it materialises each block before its turn and writes and frees it
    after, so :func:`walk_blocks` holds one block at a time."""

    # first block to run, its inputs (None: capture); ``ids``: the token ids the capture will embed (None: no capture)
    def resume(self, ids: torch.Tensor | None = None) -> tuple[int, list[torch.Tensor] | None]: ...
    def captured(self) -> None: ...  # block 0's inputs are captured: the embedding may go
    def load(self, i: int) -> None: ...
    def release(self, i: int, next_inputs: list[torch.Tensor] | None) -> None: ...  # None: no calibration pass
    def done(self) -> None: ...  # after the last block: the rest of the model (embedding, norm, head)


def block_source(model: nn.Module) -> BlockSource | None:
    return getattr(model, "lmpress_blocks", None)


def ranks() -> tuple[int, int]:
    """``(rank, world)`` of the torch.distributed group this process belongs to; ``(0, 1)`` outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(calib: torch.Tensor, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """This rank's calibration rows: whole batches, dealt out in contiguous runs as even as can be,
    so each rank runs the very batches one process would (same products) and only the final sums
    are added in another order. calib: (n, L)"""
    n_batches = -(-calib.shape[0] // batch_size)
    if n_batches < world:  # the same answer on every rank: all refuse, none waits in a collective
        from .errors import InputError

        raise InputError(f"{world} processes share the calibration rows in batches of {batch_size}: give at least "
                         f"{world * batch_size} calibration samples, or fewer processes")
    lo, hi = rank * n_batches // world, (rank + 1) * n_batches // world
    return calib[lo * batch_size : hi * batch_size]


def walk_blocks(
    model: nn.Module,
    calib: torch.Tensor,
    fn: Callable[[BlockContext], None],
    *,
    batch_size: int = PASS_BATCH,
    progress: bool | str = True,
    blocks_to_visit: Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Call ``fn`` on each decoder block in order, feeding each block the outputs of the changed
    previous block. ``calib`` is (n, L) token ids. ``progress`` is a bool or a bar label.

    ``dtype`` (e.g. ``torch.bfloat16``): run every block pass on a copy of the block in that dtype,
    with hidden states kept in it; the callback still sees and edits the block at its own precision.
    About 3x faster on CPUs with bf16 matrix units; observers then receive bf16 inputs.

    A streamed model (:func:`block_source`) has each block materialised before its turn and
    written out and freed after it. Under torch.distributed each rank runs its share of the
    calibration rows (:func:`rank_share`); :func:`lmpress.stats.collect` sums the statistics over ranks.
    """
    from .progress import bar

    spec = arch.spec_for(model)
    blocks = arch.blocks(model)
    rank, world = ranks()
    if world > 1:
        calib = rank_share(calib, batch_size, rank, world)
    source = block_source(model)
    start, inputs = source.resume(calib) if source else (0, None)
    if start and inputs is None:
        from .errors import InputError

        raise InputError(f"resuming at block {start} needs that block's checkpointed inputs, and the partial output has none "
                         "(its hidden/ folder was removed): delete the partial output (.OUT.partial) to start again")
    extras = record_extras(model, calib[:1])
    if inputs is None:
        inputs = first_inputs(model, calib, batch_size)
    if source:
        source.captured()
    if dtype is not None:
        inputs = [x.to(dtype) for x in inputs]
        extras = [_cast(e, dtype) for e in extras]
    visit = set(range(len(blocks)) if blocks_to_visit is None else blocks_to_visit)
    label = progress if isinstance(progress, str) else "blocks"
    for i in bar(range(start, len(blocks)), desc=label, enabled=bool(progress)):
        if source:
            source.load(i)
        ctx = BlockContext(i, f"{spec.blocks}.{i}", blocks[i], inputs, extras[i], dtype, rank, world)
        if i in visit:
            fn(ctx)
        if i + 1 < len(blocks):
            ctx.advance()  # the inputs become the next block's, batch by batch (one set lives at once)
        for fn_done in ctx._deferred:
            fn_done()
        del ctx
        if source:
            source.release(i, inputs)
    if source:
        source.done()


def each_block(model: nn.Module, fn: Callable[[str, nn.Module], None], *, progress: bool | str = True) -> None:
    """Call ``fn(name, block)`` on each decoder block in order, with no calibration pass: for methods
    that read only the weights (RTN, plain SVD). A streamed model (:func:`block_source`) has each
    block materialised before its turn and written out and freed after it, as in :func:`walk_blocks`."""
    from .progress import bar

    spec = arch.spec_for(model)
    blocks = arch.blocks(model)
    source = block_source(model)
    start = source.resume()[0] if source else 0
    if source:
        source.captured()
    label = progress if isinstance(progress, str) else "blocks"
    for i in bar(range(start, len(blocks)), desc=label, enabled=bool(progress)):
        if source:
            source.load(i)
        fn(f"{spec.blocks}.{i}", blocks[i])
        if source:
            source.release(i, None)
    if source:
        source.done()


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
