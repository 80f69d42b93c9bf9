"""Streaming compression: a model larger than memory, one decoder block at a time.

The model is built from its config with its parameters on the meta device (buffers such as rotary
frequencies computed as usual). :class:`BlockStream`, set as the model's ``lmpress_blocks``, is the
:class:`lmpress.calib.BlockSource` of the one calibration pipeline (:func:`lmpress.calib.walk_blocks`):

1. the embedding is read (float32, as :func:`lmpress.load_model` holds it) and block 0's inputs are
   captured, then the embedding is dropped again;
2. before block ``i``'s turn its tensors are read from the safetensors shards (memory-mapped, one
   block at a time, converted to float32 row by row); the method's own callback calibrates and
   changes it exactly as in memory;
3. after its turn (its outputs computed for block ``i + 1``) the method's finishing step runs on it,
   its tensors are written as one shard of the output, the next block's inputs are checkpointed, and
   the block goes back to the meta device;
4. after the last block the rest (embedding, final norm, head) is read, the method's whole-model
   tail runs (e.g. GPTQ's ``head_bits``), and the last shard, ``config.json``, the index and the
   tokenizer are written; the folder is renamed into place.

Peak memory is about one block in float32, its statistics and the calibration hidden states, plus
the process itself, whatever the number of blocks. The output is ``model-0000i-of-0000N.safetensors``
(one per block, then one for the rest) with ``model.safetensors.index.json``; its tensors are those
the in-memory path writes, byte for byte (``tests/test_stream.py``: the shards merged into one file
equal the in-memory ``model.safetensors``). An interrupted run leaves ``.OUT.partial`` beside ``OUT``;
the same command resumes after the last finished block, with the same bytes as an uninterrupted run.

Streamed: the methods that work block by block through the pipeline (:data:`STREAMED`). The others
need the whole model at once (distillation, width and depth pruning's global importance, allocations
chosen over all blocks: OWL, the low-rank methods' ``energy``) and say so when the model does not fit.
Low-rank factors are written in lmpress's own layout, sharded the same way."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import arch
from .errors import InputError

STREAMED = ("rtn", "gptq", "wanda", "sparsegpt", "awq", "svd", "asvd", "svd-llm", "dsformer")
WHOLE_MODEL = {"distill": "trains the whole student against the teacher",
               "prune-width": "ranks channels and heads over all blocks at once",
               "prune-depth": "scores every block before dropping any"}
INDEX = "model.safetensors.index.json"
PROGRESS = "stream-progress.json"
ROWS = 4096  # rows converted at a time when a stored dtype differs from float32


# ---- reading the input shards --------------------------------------------------------------------
class Shards:
    """The safetensors files of a model folder: which file holds each tensor, and reading a set of
    tensors as float32 with plain reads, a slice of rows at a time (no memory map: the pages of a
    mapped file would count in the process's resident memory while it stays open)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where: dict[str, str] = {}  # tensor name -> file
        self.headers: dict[str, tuple[dict, int]] = {}  # file -> (header, offset of the data)
        for f in sorted(self.folder.glob("*.safetensors")):
            header, base = _header(f)
            self.headers[f.name] = (header, base)
            self.where.update({k: f.name for k in header if k != "__metadata__"})
        if not self.where:
            raise InputError(f"{folder} has no safetensors weights to stream; streaming reads safetensors folders")

    def read(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` converted to ``dtype``; a clear error for a missing name."""
        missing = [n for n in names if n not in self.where]
        if missing:
            raise InputError(f"{self.folder}: the weight files lack {missing[:3]}; streaming reads checkpoints whose "
                             "tensor names are transformers' own: re-save the model, or give --max-memory enough to load it")
        out = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for file, group in sorted(by_file.items()):
            header, base = self.headers[file]
            with open(self.folder / file, "rb", buffering=0) as f:
                for n in group:
                    out[n] = _read_tensor(f, base, header[n], dtype)
        return out


class PackedShards(Shards):
    """The shards of a compressed-tensors folder (lmpress's or llm-compressor's ``pack-quantized``): each
    packed layer becomes, when its block is read, the layer :func:`lmpress.formats.compressed_tensors.read`
    makes of it in memory (a :class:`QuantLinear`, or a float layer with the exact dequantized weight)."""

    def __init__(self, folder: Path, raw_config: dict):
        from .formats import compressed_tensors as ct

        super().__init__(folder)
        self.groups, self.ignore = ct._check_config(raw_config.get("quantization_config") or {}, self.folder)
        self.packed = sorted(k.removesuffix(".weight_packed") for k in self.where if k.endswith(".weight_packed"))

    def _layer(self, name: str, keys=None) -> dict[str, torch.Tensor]:
        from .formats.compressed_tensors import _PARAM_NAMES

        return self.read([f"{name}.{k}" for k in keys or _PARAM_NAMES if f"{name}.{k}" in self.where])

    def _args(self, model: nn.Module, name: str) -> dict:
        from .formats import compressed_tensors as ct

        return ct._scheme_for(name, model.get_submodule(name), self.groups, self.ignore, self.folder)

    def install(self, model: nn.Module, prefix: str) -> None:
        """Build the packed layers named ``prefix...`` into ``model`` from their tensors."""
        from .formats import compressed_tensors as ct

        for name in [n for n in self.packed if n.startswith(prefix)]:
            module = model.get_submodule(name)
            layer = {k.rsplit(".", 1)[1]: v for k, v in self._layer(name).items()}
            bias = self.read([f"{name}.bias"])[f"{name}.bias"] if f"{name}.bias" in self.where else None
            built, _ = ct.build_layer(layer, self._args(model, name), module, bias)
            if isinstance(built, torch.Tensor):
                module.weight = nn.Parameter(built, requires_grad=False)
            else:
                arch.set_module(model, name, built)

    def shape_layers(self, model: nn.Module) -> None:
        """Swap each packed layer of the skeleton ``model`` for the layer it loads as, on the meta device
        (reading only scales, shapes and g_idx), so sizes and bits per weight count as in memory."""
        from .formats import compressed_tensors as ct

        ct.check_untied_head(model, self.packed, self.folder)
        for name in self.packed:
            module = model.get_submodule(name)
            layer = {k.rsplit(".", 1)[1]: v for k, v in self._layer(name, ("weight_scale", "weight_shape", "weight_g_idx")).items()}
            empty = ct.empty_layer(layer, self._args(model, name), module)
            if empty is not None:
                arch.set_module(model, name, empty)


def open_shards(folder: Path) -> Shards:
    """:class:`PackedShards` for a compressed-tensors folder, else :class:`Shards`."""
    from .formats import compressed_tensors as ct
    from .io import _check_folder

    raw = _check_folder(Path(folder), False)
    return PackedShards(folder, raw) if ct.is_compressed_tensors(raw) else Shards(folder)


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data offsets) and where its data starts."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            return json.loads(f.read(n)), 8 + n
        except ValueError as e:
            raise InputError(f"{file} is not a readable safetensors file ({e}); it is corrupt, re-save it") from None


def _read_exactly(f, dst: torch.Tensor) -> None:
    """Fill the contiguous ``dst`` from ``f``'s position; a clear error when the file ends first."""
    if f.readinto(dst.reshape(-1).view(torch.uint8).numpy()) != dst.numel() * dst.element_size():
        raise InputError(f"{f.name} is truncated; the download or save did not finish: fetch or save it again")


def _read_tensor(f, base: int, entry: dict, dtype: torch.dtype) -> torch.Tensor:
    """One tensor in ``dtype`` (floating point; others as stored), read ``ROWS`` rows at a time."""
    if entry["dtype"] not in DTYPES:
        raise InputError(f"tensor dtype {entry['dtype']} is not one lmpress streams ({', '.join(DTYPES)})")
    stored = DTYPES[entry["dtype"]]
    dtype = dtype if stored.is_floating_point else stored
    shape, a = entry["shape"], entry["data_offsets"][0]
    out = torch.empty(shape, dtype=dtype)
    if out.numel() == 0:
        return out
    rows = out.view(shape[0], -1) if shape else out.view(1, 1)  # (rows, row elements)
    f.seek(base + a)
    for r in range(0, rows.shape[0], ROWS):
        k = min(ROWS, rows.shape[0] - r)
        same = stored == dtype
        dst = rows[r : r + k] if same else torch.empty((k, rows.shape[1]), dtype=stored)  # contiguous either way
        _read_exactly(f, dst)
        if not same:
            rows[r : r + k] = dst.to(dtype)
    return out


def skeleton(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``folder``'s config: parameters on the meta device, buffers computed, float32,
    the attention implementation :func:`lmpress.load_model` would pick."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .io import _check_decoder

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):  # a compressed-tensors folder: its packed layers are built as read
        del config.quantization_config
    _check_decoder(config, folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.eval()


def _checkpoint_name(model: nn.Module, shards: Shards, name: str) -> str:
    """The name ``name`` (a state-dict key) has in the checkpoint: itself, or without the base model prefix."""
    if name in shards.where:
        return name
    base = getattr(model, "base_model_prefix", "")
    short = name.removeprefix(f"{base}.") if base else name
    return short if short in shards.where else name


def load_into(model: nn.Module, module: nn.Module, prefix: str, shards: Shards) -> None:
    """Materialise ``module`` (named ``prefix`` in ``model``) from the shards, in float32 (packed layers of a
    compressed-tensors folder as lmpress loads them)."""
    if isinstance(shards, PackedShards):
        shards.install(model, prefix)
    keys = [k for k, v in module.state_dict().items() if v.is_meta]
    names = {k: _checkpoint_name(model, shards, prefix + k) for k in keys}
    got = shards.read(list(names.values()))
    module.load_state_dict({k: got[n] for k, n in names.items()}, strict=False, assign=True)


def load_rows_into(model: nn.Module, embed: nn.Module, prefix: str, shards: Shards, ids: torch.Tensor) -> None:
    """Materialise the embedding ``embed`` with only the rows of the tokens in ``ids`` read (float32);
    the others are zero pages the process never touches, so they take no memory (a 151,936 x 1536
    embedding is 0.93 GB in float32; the rows of 64 x 512 calibration tokens are a few percent of it).
    An embedding with more than one tensor, or a packed one, is read whole."""
    keys = [k for k, v in embed.state_dict().items() if v.is_meta]
    if keys != ["weight"] or isinstance(shards, PackedShards) or embed.weight.dim() != 2:
        return load_into(model, embed, prefix, shards)
    import numpy as np

    name = _checkpoint_name(model, shards, prefix + "weight")
    header, base = shards.headers[shards.where[name]]
    table = torch.from_numpy(np.zeros(tuple(embed.weight.shape), dtype=np.float32))  # calloc: zero pages, untouched
    if list(header[name]["shape"]) != list(table.shape):
        raise InputError(f"{shards.folder}: {name} has shape {header[name]['shape']}, the config says {list(table.shape)}")
    rows = torch.unique(ids.reshape(-1)).tolist()
    with open(shards.folder / shards.where[name], "rb", buffering=0) as f:
        for r, row in zip(rows, _read_rows(f, base, header[name], rows)):
            table[r] = row
    embed.weight = nn.Parameter(table, requires_grad=False)


def _read_rows(f, base: int, entry: dict, rows: list[int]):
    """The rows ``rows`` (sorted) of a 2-d tensor, each as float32; runs of adjacent rows in one read."""
    if entry["dtype"] not in DTYPES or not DTYPES[entry["dtype"]].is_floating_point:
        raise InputError(f"an embedding of dtype {entry['dtype']} is not one lmpress streams")
    stored = DTYPES[entry["dtype"]]
    (a, b), n = entry["data_offsets"], entry["shape"][0]
    per_row = (b - a) // n
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1 and j + 1 - i < ROWS:
            j += 1
        if rows[i] < 0 or rows[j] >= n:
            raise InputError(f"token id {rows[j]} is outside the embedding's {n} rows: the tokenizer does not match the model")
        dst = torch.empty((j + 1 - i, entry["shape"][1]), dtype=stored)
        f.seek(base + a + rows[i] * per_row)
        _read_exactly(f, dst)
        yield from dst.float()
        i = j + 1


# ---- the block source ----------------------------------------------------------------------------
class BlockStream:
    """:class:`lmpress.calib.BlockSource` of a streamed model: reads each block before its turn,
    finishes, writes and frees it after (see the module docstring); with ``out`` None (evaluation)
    it writes nothing."""

    def __init__(self, model: nn.Module, shards: Shards, out: OutputShards | None, finish=None):
        self.model, self.shards, self.out, self.finish = model, shards, out, finish
        self.prefix = arch.spec_for(model).blocks
        self.blocks = arch.blocks(model)
        self.empty: dict[int, nn.Module] = {}
        self.seconds: dict[int, float] = {}  # wall time of each block: read, calibrate, compress, write
        self.embed = model.get_input_embeddings()
        self.embed_name = next(n for n, m in model.named_modules() if m is self.embed)

    def resume(self, ids: torch.Tensor | None = None):
        """The first block to run and its inputs; the embedding is read for the capture of block 0's
        inputs (and the extras) from ``ids``: only the rows of the tokens ``ids`` holds (None: none)."""
        start, inputs = self.out.resume_point() if self.out else (0, None)
        if ids is not None:
            load_rows_into(self.model, self.embed, f"{self.embed_name}.", self.shards, ids)
        return start, inputs

    def captured(self) -> None:
        self.embed.weight = nn.Parameter(torch.empty_like(self.embed.weight, device="meta"), requires_grad=False)

    def load(self, i: int) -> None:
        import time

        self.seconds[i] = -time.perf_counter()
        self.empty[i] = copy.deepcopy(self.blocks[i])  # still on the meta device: cheap
        load_into(self.model, self.blocks[i], f"{self.prefix}.{i}.", self.shards)

    def release(self, i: int, next_inputs: list[torch.Tensor]) -> None:
        if self.finish is not None:  # the method's finishing step, on this block (the others are meta)
            self.finish(self.model)
        if self.out is not None:
            self.out.write_block(i, self.blocks[i], f"{self.prefix}.{i}.", next_inputs if i + 1 < len(self.blocks) else None)
        self.blocks[i] = self.empty.pop(i)
        _return_freed_memory()
        import time

        self.seconds[i] += time.perf_counter()

    def done(self) -> None:
        """The rest of the model (embedding, final norm, head) in float32, tied as configured."""
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        head = next((n for n, m in self.model.named_modules() if m is self.model.get_output_embeddings()), None)
        if isinstance(self.shards, PackedShards):  # a packed head (compressed-tensors' untied 8-bit head)
            if head is not None:
                self.shards.install(self.model, head)
        keys = [k for k, v in self.model.state_dict().items()
                if v.is_meta and not k.startswith(f"{self.prefix}.") and not (tied and k == f"{head}.weight")]
        names = {k: _checkpoint_name(self.model, self.shards, k) for k in keys}
        got = self.shards.read(list(names.values()))
        self.model.load_state_dict({k: got[n] for k, n in names.items()}, strict=False, assign=True)
        if tied:
            self.model.tie_weights()


# ---- writing the output shards -------------------------------------------------------------------
class OutputShards:
    """The output folder of a streamed run, filled under ``.OUT.partial`` beside ``OUT``: one shard
    per block (written with its tensors sorted, as ``save_file`` orders them), the next block's
    inputs as a checkpoint, ``stream-progress.json`` naming the finished blocks; the last shard,
    the index, the config and the tokenizer at the end, then one rename."""

    def __init__(self, out: Path, fingerprint: str, n_blocks: int, fmt: str, ref: dict[str, nn.Module], metadata: dict,
                 rank: int = 0, world: int = 1):
        self.out, self.fingerprint, self.n, self.fmt, self.ref, self.metadata = out, fingerprint, n_blocks, fmt, ref, metadata
        self.rank, self.world = rank, world
        self.partial = out.with_name(f".{out.name}.partial")
        # under torchrun each rank holds its own calibration rows: its own checkpoint of hidden states
        self.hidden = self.partial / ("hidden" if world == 1 else f"hidden-{rank}-of-{world}")
        self.settings: dict[str, dict] = {}  # compressed-tensors weights arguments of each quantized layer
        self.weight_map: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.resumed_at = 0
        if rank == 0:
            self.state = self._open()
        self._barrier()  # the other ranks read what rank 0 found or made
        if rank > 0:
            self.state = self._read_progress()

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _read_progress(self) -> dict:
        """A rank other than 0: the progress rank 0 opened (the output must be on a filesystem every rank sees)."""
        try:
            state = json.loads((self.partial / PROGRESS).read_text())
        except (OSError, ValueError):
            raise InputError(f"rank {self.rank} cannot read {self.partial / PROGRESS}, which rank 0 wrote: a streamed "
                             "compression under torchrun needs its output on a filesystem every process sees") from None
        if state.get("fingerprint") == self.fingerprint:
            self.settings, self.weight_map, self.sizes = state.get("settings", {}), state.get("weight_map", {}), state.get("sizes", {})
            self.resumed_at = state["done"]
        return state

    def _open(self) -> dict:
        prog = self.partial / PROGRESS
        if prog.exists():
            try:
                state = json.loads(prog.read_text())
            except ValueError:
                state = {}
            if state.get("fingerprint") == self.fingerprint:
                self.settings, self.weight_map, self.sizes = state["settings"], state["weight_map"], state["sizes"]
                self.resumed_at = state["done"]
                return state
        shutil.rmtree(self.partial, ignore_errors=True)  # another run's leftovers (other input or options)
        self.partial.mkdir(parents=True)
        state = {"fingerprint": self.fingerprint, "done": 0}
        if self.world > 1:  # the other ranks read it after the barrier
            self.state = state
            self._commit()
        return state

    def shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n + 1:05d}.safetensors"

    def resume_point(self) -> tuple[int, list[torch.Tensor] | None]:
        hidden = self.hidden  # absent for methods with no calibration pass (RTN)
        if self.resumed_at == 0 or not hidden.exists():
            return self.resumed_at, None
        return self.resumed_at, _load_hidden(hidden)

    def write_block(self, i: int, block: nn.Module, prefix: str, next_inputs) -> None:
        """Rank 0 writes the block's shard; every rank checkpoints its hidden states; once all have,
        rank 0 records the block as done (so a resume never finds a rank's checkpoint missing)."""
        if self.rank == 0:
            state = self._state(block, prefix)
            self._record_layers(block, prefix)
            self._save(state, self.shard_name(i))
        if next_inputs is not None:
            _save_hidden(next_inputs, self.hidden)
        self._barrier()
        self.state["done"] = i + 1
        if self.rank == 0:
            self._commit()

    def _record_layers(self, module: nn.Module, prefix: str = "") -> None:
        """Keep what the config records of ``module``'s compressed layers: their compressed-tensors
        weights arguments, or lmpress's layer metadata."""
        if self.fmt == "compressed-tensors":
            from .formats import compressed_tensors as ct

            self.settings.update(ct.layer_settings(module, self.metadata, prefix))
        elif self.fmt == "lmpress":
            from .formats import layer_metadata

            self.settings.update({prefix + k: v for k, v in layer_metadata(module).items()})

    def _state(self, module: nn.Module, prefix: str, skip: str | None = None) -> dict[str, torch.Tensor]:
        if self.fmt == "lmpress":
            from .formats import native

            return native.checkpoint_state(module, prefix, skip)
        if self.fmt == "compressed-tensors":
            from .formats import compressed_tensors as ct

            return ct.checkpoint_state(module, self.ref, prefix=prefix, scale_dtype=torch.float32, skip=skip)
        from .formats import hf

        state = hf.dense_state(module, ref=self.ref, prefix=prefix)
        return {k: v for k, v in state.items() if not (skip and k.startswith(skip))}

    def _save(self, state: dict[str, torch.Tensor], name: str) -> None:
        from safetensors.torch import save_file

        tmp = self.partial / f"{name}.tmp"
        save_file(dict(sorted(state.items())), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.partial / name)
        self.weight_map.update({k: name for k in state})
        self.sizes[name] = sum(v.numel() * v.element_size() for v in state.values())

    def _commit(self) -> None:
        self.state.update(settings=self.settings, weight_map=self.weight_map, sizes=self.sizes)
        tmp = self.partial / f"{PROGRESS}.tmp"
        tmp.write_text(json.dumps(self.state, sort_keys=True))
        os.replace(tmp, self.partial / PROGRESS)

    def finish(self, model: nn.Module, tokenizer, skip: str) -> Path:
        """Write the rest (embedding, norm, head), config, index and tokenizer; rename into place (rank 0;
        the other ranks wait for it)."""
        if self.rank > 0:
            self._barrier()
            return self.out
        try:
            return self._finish(model, tokenizer, skip)
        finally:
            self._barrier()

    def _finish(self, model: nn.Module, tokenizer, skip: str) -> Path:
        state = self._state(model, "", skip=skip)
        self._record_layers(model)  # a quantized head (the blocks are back on the meta device, as loaded)
        if self.fmt == "hf":
            state = _untied(state)
        self._save(state, self.shard_name(self.n))
        self._config(model)
        index = {"metadata": {"total_size": sum(self.sizes.values())}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.partial / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(self.partial)
        for p in [self.partial / PROGRESS, *self.partial.glob("hidden*")]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        if self.out.exists():
            trash = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, trash)
            os.replace(self.partial, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.partial, self.out)
        return self.out

    def _config(self, model: nn.Module) -> None:
        if self.fmt == "lmpress":
            from .formats import native

            native.write_config(model.config, self.partial, self.metadata, self.settings)
            return
        if self.fmt == "compressed-tensors":
            from .formats import compressed_tensors as ct

            ct.write_config(model.config, self.partial, self.settings, ct.float_linears(self.ref, self.settings), self.metadata)
            return
        # the files a plain save writes besides the weights (config with lmpress's metadata, generation config)
        model.config.save_pretrained(self.partial)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(self.partial)
        cfg_file = self.partial / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["lmpress"] = {**self.metadata, "format": "hf"}
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _return_freed_memory() -> None:
    """Hand the heap memory freed with a block back to the system (glibc keeps freed blocks of the
    sizes a GPTQ sweep allocates in its arenas: without this the resident size grew by about one
    block every block). A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tensor shared by several names (a tied head) once, under its first name, as a plain save does."""
    seen, out = set(), {}
    for k, v in state.items():
        if v.numel() and v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


def _save_hidden(xs: list[torch.Tensor], folder: Path) -> None:
    """The next block's inputs, exactly (raw bytes, one file per batch), replacing the previous set
    atomically: written beside it, then swapped in by one rename."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = []
    for k, x in enumerate(xs):
        x = x.contiguous()
        with open(tmp / f"{k}.bin", "wb") as f:
            f.write(x.reshape(-1).view(torch.uint8).numpy() if x.numel() else b"")  # from the tensor's own memory, no copy
        meta.append({"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")})
    (tmp / "meta.json").write_text(json.dumps(meta))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_hidden(folder: Path) -> list[torch.Tensor]:
    import numpy as np

    meta = json.loads((folder / "meta.json").read_text())
    out = []
    for k, m in enumerate(meta):
        raw = torch.from_numpy(np.fromfile(folder / f"{k}.bin", dtype=np.uint8))
        out.append(raw.view(getattr(torch, m["dtype"])).reshape(m["shape"]))
    return out


# ---- memory plan ---------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``8GiB``, ``512MiB``, ``3GB``, ``1.5G`` or a number of bytes -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise InputError(f"--max-memory {text!r}: give a size such as 8GiB, 512MiB or 3GB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(num * base ** " KMGT".index(unit or " "))


def available_memory() -> int:
    """MemAvailable of this machine (bytes), or a cgroup limit below it."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            lim = Path(f).read_text().strip()
            if lim.isdigit() and int(lim) < (avail or 1 << 62):
                avail = int(lim)
        except OSError:
            pass
    return avail or 1 << 62


BASELINE = 450 << 20  # a process with torch, transformers, a tokenizer and calibration ids (measured ~0.37 GiB)


def memory_plan(model: nn.Module, calib_rows: int, calib_len: int, copies: int = 2) -> dict:
    """Estimated peak bytes in memory and streamed, from the skeleton's shapes (float32 weights);
    ``copies`` of the weights in memory (compress keeps the original beside the compressed copy)."""
    def packed(module):  # packed layers (a compressed-tensors skeleton): their buffers as stored
        return sum(b.numel() * b.element_size() for m in module.modules() if getattr(m, "lmpress_linear", False)
                   for b in m.buffers(recurse=False))

    per_block = [sum(p.numel() for p in b.parameters()) * 4 + packed(b) for b in arch.blocks(model)]
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * 4 + packed(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    acts = calib_rows * calib_len * hidden * 4
    widest = max((getattr(m, "in_features", None) or arch.linear_weight(m).shape[1]
                  for m in arch.block_linears(arch.blocks(model)[0]).values()), default=0)
    hessians = 2 * widest * widest * 4 + 3 * hidden * hidden * 4  # the widest input's H and its factor, the others
    emb = model.get_input_embeddings().weight.numel() * 4
    # in memory: the loaded model and the compressed copy (compress keeps the original), one set of hidden states
    return {"in_memory": BASELINE + copies * total + acts,
            "streaming": BASELINE + max(emb + acts, max(per_block) + hessians + acts), "weights_float32": total}


def decide(model: nn.Module, data, max_memory: int | None, evaluation: bool = False) -> tuple[bool, dict]:
    """Whether to stream: when the in-memory estimate exceeds ``max_memory`` (default: the memory
    available now). Returns ``(stream, plan)``. ``evaluation``: one copy of the weights, the
    evaluation windows' hidden states (an upper bound: ``context`` tokens per ``context - 1``)."""
    rows, length = (data.eval_tokens, 1) if evaluation else (data.calib_samples, data.calib_len)
    plan = memory_plan(model, rows, length, copies=1 if evaluation else 2)
    budget = max_memory if max_memory is not None else available_memory()
    plan["budget"] = budget
    return plan["in_memory"] > budget, plan


def check_streamable(recipe: list) -> None:
    """Streaming runs one layer-wise step; anything else needs the whole model in memory."""
    from . import recipe as rc

    if len(recipe) != 1:
        raise InputError(f"a recipe of {len(recipe)} steps needs the whole model in memory, which does not fit the memory "
                         f"budget; stream one layer-wise step at a time ({', '.join(STREAMED)}), or raise --max-memory")
    cfg = recipe[0]
    if cfg.method in WHOLE_MODEL:
        raise InputError(f"{cfg.method} needs the whole model in memory at once (it {WHOLE_MODEL[cfg.method]}), and the "
                         f"model does not fit the memory budget (--max-memory, or the memory available); use a machine "
                         f"with more memory, or a method streamed block by block ({', '.join(STREAMED)})")
    if cfg.method not in STREAMED:
        raise InputError(f"{cfg.method} is not streamed block by block yet, and the model does not fit the memory budget "
                         f"(--max-memory, or the memory available); the streamed methods are {', '.join(STREAMED)}")
    if getattr(cfg, "allocation", "uniform") != "uniform" and getattr(cfg, "k", None) is None:
        raise InputError(f"{cfg.method} with allocation={cfg.allocation} measures every block before changing any (a pass "
                         "over the whole model, then a global choice); streamed, use allocation: uniform, or raise --max-memory")
    if getattr(cfg, "gguf", None):
        raise InputError(f"{cfg.method} with gguf={cfg.gguf} solves on llama.cpp's grids and is written as one GGUF file in "
                         "memory; drop gguf to stream (compressed-tensors output), or raise --max-memory")
    if rc.entry(cfg.method).finish and getattr(cfg, "bits", None):
        raise InputError("sparsegpt with bits (joint pruning and quantization) is not streamed yet; raise --max-memory")


def fingerprint(folder: Path, recipe: list, data, fmt: str) -> str:
    """What a partial output must match to be resumed: the input's files, the recipe, the data, the format."""
    from . import __version__
    from . import recipe as rc

    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors"))
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    import dataclasses

    h.update(json.dumps([rc.to_dict(c) for c in recipe], sort_keys=True, default=str).encode())
    h.update(json.dumps(dataclasses.asdict(data), sort_keys=True, default=str).encode())
    h.update(f"{fmt};{__version__}".encode())
    return h.hexdigest()


# ---- the streamed run ----------------------------------------------------------------------------
def compress(folder: Path, recipe: list, tokenizer, calib: torch.Tensor, data, out: Path, *, format: str = "auto",
             metadata: dict, progress: bool = True, trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """Apply ``recipe`` (one layer-wise step) to the model in ``folder`` block by block and write it
    to ``out``; returns the skeleton (its blocks back on the meta device) and the step's figures."""
    from . import recipe as rc
    from .calib import ranks
    from .formats import compressed_tensors as ct

    check_streamable(recipe)
    rank, world = ranks()
    cfg = recipe[0]
    model = skeleton(folder, trust_remote_code)
    shards = Shards(folder)
    fmt = _stream_format(cfg, format)
    ref = ct._reference(model)
    key = fingerprint(folder, recipe, data, fmt) + (f"-{world}" if world > 1 else "")  # checkpoints are per rank
    sink = OutputShards(out, key, len(arch.blocks(model)), fmt, ref, metadata, rank, world)
    finish = _finish_step(cfg)
    source = model.lmpress_blocks = BlockStream(model, shards, sink, finish)
    _, fn = rc._entry(cfg.method)
    ctx = rc.RunContext(calib=calib, tokenizer=tokenizer, data=data, progress=progress)
    try:
        info = fn(model, cfg, ctx) or {}
    finally:
        del model.lmpress_blocks
    info.update(finish.info if finish else {})
    saved = sink.finish(model, tokenizer, skip=f"{arch.spec_for(model).blocks}.")
    info["streamed"] = {"blocks": sink.n, "resumed_at_block": sink.resumed_at, "format": fmt, "output": str(saved),
                        "block_seconds": [round(source.seconds[i], 3) for i in sorted(source.seconds)]}
    return model, info


def _finish_step(cfg):
    """The method's finishing step, run on each block before it is written (``None``: none)."""
    from . import recipe as rc

    spec = rc.entry(cfg.method).finish
    if not spec:
        return None
    mod, _, name = spec.partition(":")
    step = getattr(rc._import(mod), name)
    info: dict = {}

    def run(model):
        for k, v in (step(model, cfg) or {}).items():
            info.setdefault(k, {}).update(v)

    run.info = info
    return run


HOLDS = {"hf": ("prune",), "compressed-tensors": ("quant", "prune"), "lmpress": ("quant", "prune", "lowrank")}
AUTO = {"quant": "compressed-tensors", "prune": "hf", "lowrank": "lmpress"}


def _stream_format(cfg, format: str) -> str:
    """The output format of a streamed run: what ``auto`` picks for the method's layers, decided
    before any block is written (compressed-tensors for quantization, hf for pruning, lmpress's own
    layout for low-rank factors)."""
    family = type(cfg).family
    fmt = AUTO[family] if format == "auto" else format
    if fmt not in HOLDS:
        raise InputError(f"a streamed model is written as {', '.join(HOLDS)}, not {fmt!r}; choose one of them "
                         "(or auto), or raise --max-memory")
    if family not in HOLDS[fmt]:
        raise InputError(f"a {fmt} folder cannot hold the layers {cfg.method} makes; use --format {AUTO[family]} (or auto)")
    return fmt


# ---- streamed evaluation -------------------------------------------------------------------------
class StreamedModel:
    """A model folder evaluated block by block (``lmpress eval --stream``, :func:`lmpress.evaluate`):
    its skeleton (config, shapes, parameter counts) and :meth:`log_probs` of token windows, computed
    with one block in memory at a time through the one calibration pipeline."""

    streamed = True

    def __init__(self, folder: Path, trust_remote_code: bool = False, shaped: nn.Module | None = None):
        """``shaped``: the folder's skeleton with its packed layers shaped already (:meth:`PackedShards.shape_layers`),
        as the caller that chose streaming made it (their scales are not read twice)."""
        self.folder, self.trust_remote_code = Path(folder), trust_remote_code
        self.shards = open_shards(self.folder)
        self.skeleton = shaped
        if shaped is None:
            self.skeleton = skeleton(self.folder, trust_remote_code)
            if isinstance(self.shards, PackedShards):
                self.shards.shape_layers(self.skeleton)
        if getattr(self.skeleton.config, "tie_word_embeddings", False):
            self.skeleton.tie_weights()  # counted once, as a loaded model holds it
        self.config = self.skeleton.config

    def get_output_embeddings(self):
        return self.skeleton.get_output_embeddings()

    def log_probs(self, ids: torch.Tensor, batch: int, progress: bool, desc: str):
        """Yield ``(start_row, log_probs (b, T, V) float32)`` for the windows ``ids`` (W, T) in batches of
        ``batch``: the hidden states of all windows go through each block in turn (read, applied,
        freed), then the final norm and head run batch by batch."""
        model = skeleton(self.folder, self.trust_remote_code)  # a fresh one: its rest is freed with it
        hidden = final_hidden(model, self.shards, ids, batch, progress=desc if progress else False)
        for k, h in enumerate(hidden):
            with torch.inference_mode():
                logits = head_logits(model, ids[k * batch : (k + 1) * batch], h)
            yield k * batch, torch.log_softmax(logits.float(), dim=-1)


def final_hidden(model: nn.Module, shards: Shards, ids: torch.Tensor, batch: int, progress) -> list[torch.Tensor]:
    """The last block's outputs for the windows ``ids`` (W, T), one (b, T, hidden) tensor per batch,
    with each block read before its turn and freed after; the rest of the model is loaded at the end."""
    from .calib import walk_blocks

    out: list[torch.Tensor] = []
    last = len(arch.blocks(model)) - 1

    def keep_outputs(ctx):  # walk_blocks advances every block but the last
        ctx.advance()
        out.extend(ctx.inputs)

    model.lmpress_blocks = BlockStream(model, shards, None)
    try:
        walk_blocks(model, ids, keep_outputs, batch_size=batch, progress=progress, blocks_to_visit=[last])
    finally:
        del model.lmpress_blocks
    return out


def head_logits(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own forward over ``ids`` (b, T) with its blocks replaced by ``hidden`` (b, T, hidden),
    the last block's outputs: what follows the blocks (final norm, head, logit scaling) runs as the
    model defines it. Returns the logits (b, T, V)."""
    blocks = arch.blocks(model)

    def through(i):
        return lambda *args, **kw: hidden if i == 0 else args[0]

    for i, b in enumerate(blocks):
        b.forward = through(i)  # an instance attribute, as calib.record_extras does
    try:
        return model(ids, use_cache=False).logits
    finally:
        for b in blocks:
            del b.forward
