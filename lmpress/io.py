"""Model input/output: local Hugging Face folders, GGUF files and built-in names; atomic saving.

Loading never executes untrusted code: safetensors and GGUF are read by default, pickle checkpoints
(``*.bin``, ``*.pt``) only with ``allow_pickle=True``, and ``trust_remote_code`` stays off unless
asked for.
"""

from __future__ import annotations

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
        return assets.default_model_dir(str(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"no such model: {spec!r}; give a local Hugging Face folder, a .gguf file, "
            f"or a built-in name ({', '.join(sorted(assets.MODEL_ASSETS))})"
        )
    return path


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: Any = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode on the CPU.

    ``spec`` is a built-in name (default ``smollm2-135m``), a Hugging Face folder (safetensors), a
    folder written by lmpress (packed quantized or factorized layers), or a ``.gguf`` file.
    """
    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{path}: a model file must be .gguf; for other formats give the folder")
        model, tok = load_gguf(path)
    else:
        model, tok = _load_folder(path, dtype, allow_pickle, trust_remote_code)
    model.eval()
    return model, tok


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


def _check_safetensors(file: Path) -> None:
    """Read the header and check that every tensor lies inside the file (catches truncation)."""
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


# Encoders that transformers can bolt a causal head onto, but that are not decoder LMs.
ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "albert", "mpnet",
                "deberta", "deberta-v2", "ernie", "roformer", "xlm", "data2vec-text"}


def _check_decoder(config: Any, where: Path) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    archs = getattr(config, "architectures", None) or []
    causal_arch = not archs or any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or config.model_type in ENCODER_ONLY or not causal_arch:
        raise InputError(
            f"{where}: architecture {config.model_type!r} ({', '.join(archs) or 'no architectures listed'}) "
            "is not a decoder language model; lmpress compresses causal LMs such as Llama, "
            "Qwen2, Gemma 3, GPT-2 and OPT"
        )


def _load_folder(path: Path, dtype, allow_pickle: bool, trust_remote_code: bool):
    raw = _check_folder(path, allow_pickle)
    from transformers import AutoConfig

    if "auto_map" in raw and not trust_remote_code:
        raise InputError(
            f"{path} asks to run its own Python code (auto_map in config.json); lmpress does not run "
            "it unless you pass --trust-remote-code (trust_remote_code=True)"
        )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise InputError(f"{path}/config.json is not a configuration transformers knows ({e})")
    _check_decoder(config, path)
    if "lmpress" in raw:
        from .formats import load_compressed

        model = load_compressed(path, config, raw["lmpress"])
    else:
        model = _from_pretrained(path, dtype, allow_pickle, trust_remote_code)
    return model, _load_tokenizer(path)


def _from_pretrained(path: Path, dtype, allow_pickle: bool, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype or torch.float32,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise InputError(f"could not load the weights in {path}: {str(e).splitlines()[0][:300]}")


def _load_tokenizer(path: Path, **kw):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"no usable tokenizer in {path} ({str(e).splitlines()[0][:200]}); save it beside the model")


def load_gguf(file: str | os.PathLike):
    """Load a GGUF file with transformers, dequantized to float32; returns ``(model, tokenizer)``."""
    file = Path(file)
    _check_gguf(file)
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    kw = {"gguf_file": file.name}
    try:
        tok = _load_tokenizer(file.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kw
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


def _check_gguf(file: Path) -> None:
    from gguf import GGUFReader

    try:
        GGUFReader(file)
    except Exception as e:  # the reader raises many types for a damaged file
        raise InputError(f"{file} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or corrupt")


def save_model(model, out: str | os.PathLike, *, tokenizer=None, overwrite: bool = False, extra=None) -> Path:
    """Save with ``save_pretrained`` into a temporary folder, then rename it to ``out`` atomically.

    ``extra(tmp_dir)`` may write more files (compressed weights, metadata) before the rename. An
    interrupted save leaves no half-written ``out``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another output folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if extra is None:
            model.save_pretrained(tmp)
        else:
            extra(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a model folder (or of one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf") + PICKLE_SUFFIXES)
