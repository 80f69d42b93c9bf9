"""Model input/output: local Hugging Face folders, GGUF files and built-in names; atomic saving.

Loading never executes untrusted code: safetensors and GGUF are read by default, pickle checkpoints
(``*.bin``, ``*.pt``) only with ``allow_pickle=True``, and ``trust_remote_code`` stays off unless
asked for.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model_path(spec: str | os.PathLike | None) -> Path:
    """Turn a CLI/API model spec into a local path: a built-in name, a folder, or a ``.gguf`` file."""
    from . import assets

    if spec is None:
        spec = assets.DEFAULT_MODEL_NAME
    if str(spec) in assets.MODEL_ASSETS and not Path(spec).exists():
        return builtin_model_dir(str(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"no such model: {spec!r}; give a local Hugging Face folder, a .gguf file, "
            f"or a built-in name ({', '.join(sorted(assets.MODEL_ASSETS))})"
        )
    return path


def builtin_model_dir(name: str) -> Path:
    """The built-in model ``name`` as a safetensors folder, converted once from the GGUF file that
    :mod:`lmpress.assets` fetches (loads in ~2 s instead of ~15 s)."""
    from . import assets

    folder = assets.model_cache_dir(name)
    if (folder / "config.json").exists():
        return folder
    gguf_path = assets.fetch_model(name)
    assets.log(f"converting {gguf_path.name} to a safetensors folder (once)")
    model, tokenizer = load_gguf(gguf_path)
    save_model(model, folder, tokenizer=tokenizer, format="hf")
    return folder


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: Any = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    tokenizer: bool = True,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode on the CPU.

    ``spec`` is a built-in name (default ``smollm2-135m``), a Hugging Face folder (safetensors), a
    folder written by lmpress (packed quantized or factorized layers), or a ``.gguf`` file.
    ``tokenizer=False``: the model alone (the tokenizer is None), for folders saved without one.
    """
    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{path}: a model file must be .gguf; for other formats give the folder")
        model, tok = load_gguf(path, trust_remote_code=trust_remote_code)
    else:
        model, tok = _load_folder(path, dtype, allow_pickle, trust_remote_code, tokenizer)
    model.eval()
    check_finite(model, path)
    return model, tok


def check_finite(model, where) -> None:
    """Refuse a model with NaN or infinite weights: every figure computed from it would be wrong."""
    import torch

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{where}: {name} holds NaN or infinite values; the checkpoint is damaged or was "
                             "saved after a diverged run: use another checkpoint")


def _check_folder(path: Path, allow_pickle: bool) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to load a GGUF give the file, e.g. {ggufs[0]}" if ggufs else ""
        raise InputError(f"{path} has no config.json, so it is not a Hugging Face model folder{hint}")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_file} is not valid JSON ({e}); the file is corrupt, re-save the model")
    weights = sorted(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not weights and pickles and not allow_pickle:
        raise InputError(
            f"{path} holds only pickle checkpoints ({pickles[0].name}), which can execute code when "
            "loaded; convert it to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it"
        )
    if not weights and not pickles:
        raise InputError(f"{path} has a config.json but no weights (*.safetensors)")
    for w in weights:
        _check_safetensors(w)
    return config


def _check_safetensors(file: Path) -> dict:
    """Read the header and check that every tensor lies inside the file (catches truncation); returns
    the header (``{tensor name: {"dtype", "shape", "data_offsets"}}``)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(n))
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file} is not a readable safetensors file ({e}); it is corrupt, re-save it")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise InputError(
            f"{file} is truncated ({size:,} bytes, its header needs {8 + n + end:,}); "
            "the download or save did not finish: fetch or save it again"
        )
    return header


# safetensors' names of the float dtypes a checkpoint may be stored in
SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _stored_dtypes(path: Path, model) -> dict:
    """``{tensor name: dtype}`` for the float tensors of ``model`` that the safetensors files in ``path``
    store in another dtype than the one they are held in (a bf16 checkpoint loaded as float32), so that
    sizes and bits per weight can be counted as stored (:mod:`lmpress.counts`)."""
    import torch

    held = dict(model.state_dict())
    stored = {}
    for file in sorted(path.glob("*.safetensors")):
        for name, info in _check_safetensors(file).items():
            kind, t = SAFETENSORS_FLOATS.get(info.get("dtype")), held.get(name)  # "__metadata__" has no dtype
            if kind and t is not None and t.is_floating_point() and t.dtype != getattr(torch, kind):
                stored[name] = getattr(torch, kind)
    return stored


# Encoders that transformers can bolt a causal head onto, but that are not decoder LMs.
ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "albert", "mpnet",
                "deberta", "deberta-v2", "ernie", "roformer", "xlm", "data2vec-text"}


def _check_decoder(config: Any, where: Path) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    archs = getattr(config, "architectures", None) or []
    causal_arch = not archs or any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    remote_causal = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})  # trusted remote code
    known = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or remote_causal
    if not known or config.model_type in ENCODER_ONLY or not causal_arch:
        raise InputError(
            f"{where}: architecture {config.model_type!r} ({', '.join(archs) or 'no architectures listed'}) "
            "is not a decoder language model; lmpress compresses causal LMs such as Llama, "
            "Qwen2, Gemma 3, GPT-2 and OPT"
        )


def _load_folder(path: Path, dtype, allow_pickle: bool, trust_remote_code: bool, tokenizer: bool = True):
    from . import formats

    raw = _check_folder(path, allow_pickle)
    _check_remote_code(path, raw, trust_remote_code)
    fmt = formats.detect(raw)
    if fmt == "hf":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError) as e:
            raise InputError(f"{path}/config.json is not a configuration transformers knows ({str(e).splitlines()[0][:200]})")
        _check_decoder(config, path)
        model = _from_pretrained(path, dtype, allow_pickle, trust_remote_code)
        model.lmpress_stored_dtypes = _stored_dtypes(path, model)
    else:
        reader = formats.writer(fmt)
        if hasattr(reader, "config_of"):
            _check_decoder(reader.config_of(raw, path), path)
        model = reader.read(path, raw)
        _check_decoder(model.config, path)
    model.lmpress_info = raw.get("lmpress") or {}  # the recipe and data that made it, kept by export
    model.lmpress_recipe = model.lmpress_info.get("recipe", [])
    tok = _load_tokenizer(path, config=model.config, trust_remote_code=trust_remote_code) if tokenizer else None
    return model, tok


def _check_remote_code(path: Path, raw: dict, trust_remote_code: bool) -> None:
    """Refuse a folder whose config or tokenizer names its own Python code, unless trusted."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        f = path / name
        try:
            cfg = raw if name == "config.json" else (json.loads(f.read_text()) if f.exists() else {})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{f} is not valid JSON ({e}); the file is corrupt, re-save the model")
        if isinstance(cfg, dict) and "auto_map" in cfg:
            raise InputError(
                f"{path} asks to run its own Python code (auto_map in {name}); lmpress does not run "
                "it unless you pass --trust-remote-code (trust_remote_code=True)"
            )


def _from_pretrained(path: Path, dtype, allow_pickle: bool, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype or torch.float32,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise InputError(f"could not load the weights in {path}: {str(e).splitlines()[0][:300]}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise InputError(f"{path}: the weight files lack {len(missing)} tensor(s) the model needs ({', '.join(missing[:3])}); "
                         "transformers would fill them with random values. The checkpoint is incomplete: save or fetch it again")
    return model


def _load_tokenizer(path: Path, **kw):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"no usable tokenizer in {path} ({str(e).splitlines()[0][:200]}); save it beside the model")


def load_gguf(file: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load a GGUF file with transformers, dequantized to float32; returns ``(model, tokenizer)``.
    transformers also reads a ``tokenizer_config.json`` beside the file: code it names is refused
    unless ``trust_remote_code``."""
    file = Path(file)
    fields = _check_gguf(file)
    _check_remote_code(file.parent, {}, trust_remote_code)
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    kw = {"gguf_file": file.name, "trust_remote_code": trust_remote_code}  # a bool: transformers never asks
    try:
        tok = _load_tokenizer(file.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True),
            **_gguf_config(file, fields, kw), **kw
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"could not load {file}: {str(e).splitlines()[0][:300]}")
    _check_decoder(model.config, file)
    # The weights are now plain float tensors: drop the GGUF marker so the model saves normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model, tok


def _gguf_config(file: Path, fields: dict, kw: dict) -> dict:
    """``{"config": ...}`` where transformers' GGUF reader gets a model's config wrong, else ``{}``.

    Gemma 3 (transformers 5.25): the reader ignores ``sliding_window_pattern`` (every layer becomes a
    sliding one), ``freq_base_swa`` and the query scale (it keeps ``query_pre_attn_scalar`` 256), so a
    file whose head size is not 256 would load silently wrong. They are set here as llama.cpp reads them."""
    from transformers import AutoConfig

    if "general.architecture" not in fields or fields["general.architecture"].contents() != "gemma3":
        return {}
    config = AutoConfig.from_pretrained(file.parent, **kw)

    def get(key, default=None):
        f = fields.get(f"gemma3.{key}")
        return default if f is None else f.contents()

    n, heads = get("block_count"), get("attention.head_count")
    config.query_pre_attn_scalar = config.hidden_size // heads if n == 62 else get("attention.key_length", 256)
    if get("attention.sliding_window"):
        pattern = get("attention.sliding_window_pattern")
        if not isinstance(pattern, list):  # llama.cpp's default: five sliding layers, then a global one
            period = pattern or 6
            pattern = [(i % period) < period - 1 for i in range(n)]
        config.layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
        config.sliding_window = get("attention.sliding_window")
        rope = dict(config.rope_parameters or {})
        base = float(get("rope.freq_base", 1_000_000.0))
        rope["full_attention"] = {"rope_type": "default", "rope_theta": base}
        rope["sliding_attention"] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10_000.0))}
        config.rope_parameters = rope
    return {"config": config}


def _check_gguf(file: Path) -> dict:
    """The file's metadata fields, or an InputError when it cannot be read."""
    from gguf import GGUFReader

    try:
        return GGUFReader(file).fields
    except Exception as e:  # the reader raises many types for a damaged file
        raise InputError(f"{file} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or corrupt")


def save_model(model, out: str | os.PathLike, *, tokenizer=None, format: str = "auto", recipe=None, data=None,
               overwrite: bool = False) -> Path:
    """Save ``model`` (float or compressed) to the folder ``out`` in ``format`` and return the path.

    ``format``: ``auto`` (the first of plain Hugging Face, compressed-tensors, lmpress's own layout
    that can hold the model), ``hf``, ``compressed-tensors`` or ``lmpress``; see :mod:`lmpress.formats`.
    ``recipe`` (list of method configs or dicts) and ``data`` (the :class:`~lmpress.data.DataConfig`
    used) are saved in ``config.json`` under ``"lmpress"``. The folder is written under a temporary
    name beside ``out`` and renamed into place, so an interrupted save leaves no half-written ``out``.
    """
    from . import formats

    if format.partition(":")[0] == "gguf":
        return _save_gguf(model, out, tokenizer, format, _metadata(recipe, data), overwrite)
    out = check_output(out, overwrite=overwrite)
    fmt = formats.choose(model, format)
    metadata = _metadata(recipe, data)
    saved = _atomic_folder(out, lambda tmp: _write(formats.writer(fmt), model, tmp, metadata, tokenizer))
    note = formats.load_note(saved, fmt)
    if note:
        from .assets import log

        log(f"note: {saved} is {fmt}; {note}")
    return saved


def gguf_format(format: str) -> str | None:
    """The llama.cpp file type of ``--format gguf:TYPE`` (alias resolved), None for ``gguf`` alone,
    or a clear error; for any other format, None."""
    from .quant import gguf_mix

    kind, _, name = format.partition(":")
    if kind != "gguf":
        return None
    return gguf_mix.ftype(name) if name else None


def check_gguf_output(out, *, overwrite: bool, inputs=()) -> Path:
    """:func:`check_output` for a ``.gguf`` file: the name ends in .gguf and its folder exists."""
    out = check_output(out, overwrite=overwrite, inputs=inputs)
    if out.suffix.lower() != ".gguf":
        raise InputError(f"GGUF output is one file: give -o a name ending in .gguf, not {out}")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the folder {out.parent} does not exist; create it first")
    return out


def _save_gguf(model, out, tokenizer, format: str, metadata: dict, overwrite: bool) -> Path:
    """Write ``model`` as one GGUF file: layers solved on llama.cpp's grids as they are, float matrices
    rounded to nearest in the type llama.cpp's rule gives them; refuse what would be re-rounded."""
    from .formats import gguf as fg
    from .quant import gguf_mix

    out = check_gguf_output(out, overwrite=overwrite)
    if tokenizer is None:
        raise InputError("GGUF output stores the tokenizer: give the model's tokenizer")
    steps = [s for s in metadata["recipe"] if s.get("gguf")]
    solved_as = gguf_mix.ftype(steps[-1]["gguf"]) if steps else None
    name = gguf_format(format) or solved_as
    if name is None:
        raise InputError("give the GGUF type: --format gguf:TYPE, e.g. gguf:Q4_K_M")
    if fg.check_solved(model) and name != solved_as:
        raise InputError(f"this model was solved on llama.cpp's {solved_as} grids, not {name}: export it with "
                         f"--format gguf:{solved_as}, or run lmpress compress again with --format gguf:{name}")
    last = steps[-1] if steps else {}
    types = gguf_mix.plan(model, name, imatrix=False, embed=last.get("gguf_embed"), output=last.get("gguf_output"),
                          overrides=tuple(last.get("overrides") or ()))
    fg.write_gguf(model, tokenizer, out, name, metadata, types=types)
    return out


def export(src, out: str | os.PathLike, *, format: str = "auto", overwrite: bool = False,
           allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """Convert a model (an lmpress output or any model :func:`load_model` reads) to ``format``,
    keeping its recipe and data metadata: e.g. an lmpress-layout folder to compressed-tensors."""
    gguf_format(format)  # a bad type name is an error before anything is loaded
    check = check_gguf_output if format.partition(":")[0] == "gguf" else check_output
    check(out, overwrite=overwrite, inputs=[model_input_path(src)])
    model, tok = load_model(src, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    info = getattr(model, "lmpress_info", {})
    return save_model(model, out, tokenizer=tok, format=format, recipe=info.get("recipe"), data=info.get("data"),
                      overwrite=overwrite)


def _write(writer, model, tmp: Path, metadata: dict, tokenizer) -> None:
    writer.write(model, tmp, metadata)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _metadata(recipe, data) -> dict:
    import dataclasses

    from . import __version__
    from . import recipe as rc

    steps = [s if isinstance(s, dict) else rc.to_dict(s) for s in (recipe or [])]
    data = dataclasses.asdict(data) if dataclasses.is_dataclass(data) else data
    return {"lmpress_version": __version__, "recipe": steps, "data": data}


def is_lmpress_output(path: Path) -> bool:
    """Whether ``path`` is a folder (or GGUF file) that lmpress wrote, and so may be replaced."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        try:
            from gguf import GGUFReader

            return "lmpress.metadata" in GGUFReader(path).fields
        except Exception:  # not a readable GGUF: not ours
            return False
    if path.is_dir():
        try:
            return "lmpress" in json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return False
    return False


def model_input_path(spec) -> Path | None:
    """The local path that the model ``spec`` reads, fetching nothing: a folder or file, or a built-in
    name's cache folder (None: the default model's); None when ``spec`` names nothing there."""
    from . import assets

    name = assets.DEFAULT_MODEL_NAME if spec is None else str(spec)
    if name in assets.MODEL_ASSETS and not Path(name).exists():
        return assets.model_cache_dir(name)
    path = Path(name).expanduser()
    return path if path.exists() else None


def overlapping_input(path: str | os.PathLike, inputs) -> tuple[str | None, str]:
    """The first of ``inputs`` (paths, None skipped) that ``path`` is, holds or lies inside, and which."""
    resolved = Path(path).expanduser().resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        inp = Path(given).expanduser().resolve()
        if inp == resolved or resolved in inp.parents:
            return str(given), "is or holds"
        if inp in resolved.parents:
            return str(given), "lies inside"
    return None, ""


def check_output(out: str | os.PathLike, *, overwrite: bool, inputs=()) -> Path:
    """Check an output path before any work: it must not exist unless ``overwrite``, and then only an
    earlier output of lmpress may be replaced, never a path that is or holds one of ``inputs``."""
    out = Path(out).expanduser()
    given, relation = overlapping_input(out, inputs)
    if given:
        raise InputError(f"output {out} {relation} the input {given}; write the output somewhere else")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"{out} already exists; choose another output folder or pass --overwrite")
        if not is_lmpress_output(out):
            raise InputError(f"{out} exists and is not an lmpress output, so --overwrite will not replace it; "
                             "choose another output path or remove it yourself")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent} (no write permission, or a read-only disk); choose another output folder")
    return out


def _atomic_folder(out: Path, fill) -> Path:
    """Run ``fill(tmp)`` on a fresh folder beside ``out``, then rename it to ``out`` (replacing an
    earlier one); on any failure remove the temporary folder and leave ``out`` as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot create the output folder beside {out} ({e.strerror}); choose another output folder")
    try:
        fill(tmp)
        _permissions_from_umask(tmp)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(e, out.parent)
        if reason:
            raise InputError(f"could not write {out} ({reason}); nothing was written, free space or choose another folder") from None
        raise
    return out


def write_failure(e: BaseException, folder: Path) -> str | None:
    """Why a write into ``folder`` failed, when ``e`` is an I/O failure (a full disk, a lost permission)
    as the libraries raise it: ``OSError``, safetensors' ``SafetensorError``, ``torch.save``'s
    ``RuntimeError``; None for anything else (a bug, an interrupt), which is raised as it is."""
    text = str(e)
    if isinstance(e, OSError) and e.errno is not None:
        reason = e.strerror
    elif type(e).__name__ == "SafetensorError" and "I/O error" in text:
        reason = text.rpartition("I/O error: ")[2]
    elif isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        reason = "the write stopped part way"
    else:
        return None
    try:
        return f"{reason}; {shutil.disk_usage(folder).free:,} bytes free there"
    except OSError:
        return reason


def _permissions_from_umask(folder: Path) -> None:
    """Give what was written the modes the umask allows, as ``open`` and ``mkdir`` would (tempfile and
    safetensors create 0600 files and 0700 folders whatever the umask)."""
    mask = umask()
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders that killed saves of ``out`` left (their process is gone)."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = tmp.name[len(out.name) + 6:].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a model folder (or of one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf") + PICKLE_SUFFIXES)
