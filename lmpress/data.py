"""Corpora, calibration sets and evaluation sets that never overlap.

A corpus is a list of documents. The built-in one (``wiki``) is the lead paragraphs of 10,033
English Wikipedia vital articles, sorted by title. A user corpus is a text file (documents separated
by blank lines), a folder of ``.txt``/``.md`` files, or a JSON-lines file with a ``text`` field.

The split is by document: every ``EVAL_EVERY``-th document (0, 20, 40, ... in corpus order) is
evaluation text, all others are calibration text, so no calibration sample ever shares text with
the evaluation set. A corpus with fewer than ``2 * EVAL_EVERY`` documents is first cut into
pseudo-documents of about ``CHUNK_CHARS`` characters at whitespace.

* Evaluation stream: the evaluation documents in corpus order, joined by a blank line, tokenized
  without special tokens, first ``n_tokens`` tokens.
* Calibration set: the calibration documents shuffled with ``seed``, joined by a blank line,
  tokenized until ``n * (length - 1)`` tokens, cut into ``n`` consecutive rows, each row prefixed
  with the BOS token when the tokenizer has one (so rows look like evaluation windows).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

EVAL_EVERY = 20
CHUNK_CHARS = 1000
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class DataConfig:
    """Which text to use and how much. Saved with every compressed model."""

    corpus: str | None = None  # None: the built-in Wikipedia corpus
    calib_samples: int = 128
    calib_len: int = 512
    eval_tokens: int = 4096
    seed: int = 0

    def __post_init__(self):
        for name, least in (("calib_samples", 1), ("calib_len", 2), ("eval_tokens", 2), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} (DataConfig.{name}) must be a whole number of at least {least}, got {v!r}")


def load_documents(spec: str | os.PathLike | None = None) -> list[str]:
    """Documents of a corpus: built-in name, text file, folder, or ``.jsonl`` file."""
    from . import assets

    if spec is None or str(spec) in assets.CORPUS_ASSETS and not Path(spec).exists():
        return _wiki_documents(assets.default_corpus_path(str(spec or assets.DEFAULT_CORPUS_NAME)))
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"no such corpus: {spec!r}; give a text file, a folder of .txt files, a .jsonl file, or 'wiki'")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md"))
        if not files:
            raise InputError(f"folder {path} holds no .txt or .md files")
        docs = [d for f in files for d in _paragraphs(_read_text(f))]
    elif path.suffix in (".jsonl", ".json") and path.name != "summaries_en-us.json":
        docs = _jsonl_documents(path)
    elif path.name == "summaries_en-us.json":
        docs = _wiki_documents(path)
    else:
        docs = _paragraphs(_read_text(path))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"corpus {path} holds no text")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {i} is not JSON ({e}); give one JSON object per line")
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f"{path} line {i} has no string field 'text'")
        docs.append(row["text"])
    return docs


def _wiki_documents(path: Path) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [data[t]["extract"].strip() for t in sorted(data) if data[t].get("extract", "").strip()]


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """``(calibration_docs, eval_docs)``: every ``EVAL_EVERY``-th document is evaluation text."""
    if len(docs) < 2 * EVAL_EVERY:
        docs = _chunk(SEPARATOR.join(docs), CHUNK_CHARS)
    if len(docs) < 2:
        raise InputError("the corpus is too small to split into calibration and evaluation text; give more text")
    calib = [d for i, d in enumerate(docs) if i % EVAL_EVERY]
    evals = [d for i, d in enumerate(docs) if not i % EVAL_EVERY]
    return calib, evals


def _chunk(text: str, size: int) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind(" ", start, end)
            end = cut if cut > start else end
        out.append(text[start:end].strip())
        start = end
    return [c for c in out if c]


def tokenize_until(tokenizer, docs: list[str], n_tokens: int) -> torch.Tensor:
    """Token ids of ``docs`` joined by a blank line, stopping once ``n_tokens`` are reached."""
    ids: list[int] = []
    step = 64
    for i in range(0, len(docs), step):
        text = SEPARATOR.join(docs[i : i + step]) + SEPARATOR
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise InputError(f"the text gives only {len(ids):,} tokens, {n_tokens:,} are needed; give more text or ask for fewer")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def eval_stream(tokenizer, eval_docs: list[str], n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` evaluation tokens, in corpus order."""
    return tokenize_until(tokenizer, eval_docs, n_tokens)


def calibration_set(tokenizer, calib_docs: list[str], n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``length`` tokens (BOS first when the tokenizer has one). (n, length)"""
    docs = list(calib_docs)
    random.Random(seed).shuffle(docs)
    bos = tokenizer.bos_token_id
    body = length - (bos is not None)
    ids = tokenize_until(tokenizer, docs, n * body).view(n, body)  # (n, body)
    if bos is not None:
        ids = torch.cat([torch.full((n, 1), bos, dtype=torch.long), ids], dim=1)
    return ids


def prepare(tokenizer, cfg: DataConfig = DataConfig(), *, need_calib: bool = True, need_eval: bool = True):
    """``(calibration (n, L) or None, evaluation stream or None)`` for ``cfg``."""
    calib_docs, eval_docs = split_documents(load_documents(cfg.corpus))
    calib = calibration_set(tokenizer, calib_docs, cfg.calib_samples, cfg.calib_len, cfg.seed) if need_calib else None
    stream = eval_stream(tokenizer, eval_docs, cfg.eval_tokens) if need_eval else None
    return calib, stream
