"""Zero-shot multiple-choice tasks, scored by log-likelihood (see ``evaluate.multiple_choice``).

Tasks come in BIG-bench's ``task.json`` format (Apache-2.0): ``examples`` with ``input`` and
``target_scores`` (choice -> 1 for the right answer). Two kinds are built in:

* ``wiki_cloze`` (works offline, the default for benchmarks): generated from the evaluation documents
  of the built-in Wikipedia corpus (never calibration text), LAMBADA-like. See ``cloze_items``.
* BIG-bench tasks (``social_iqa``, ...), read from the ``bigbench`` 1.0.0 source distribution on PyPI,
  streamed once, only the needed ``task.json`` kept in the cache. PyPI no longer serves that version
  (only 0.0.1, without task data), so they work only where the cache already holds them.

Prompt: ``task_prefix + example_input_prefix + input + example_output_prefix``, BIG-bench's own
defaults ``"\\nQ: "`` and ``"\\nA: "`` when the task gives none; each choice is scored as the
continuation. Items keep file order; ``limit`` takes the first N.
"""

from __future__ import annotations

import json
import os
import tarfile
import urllib.request
from pathlib import Path

from .errors import InputError

BIGBENCH = ("bigbench", "1.0.0")
BUILTIN = {
    "social_iqa": "bigbench/benchmark_tasks/social_iqa/task.json",
    "strategyqa": "bigbench/benchmark_tasks/strategyqa/task.json",
    "causal_judgment": "bigbench/benchmark_tasks/causal_judgment/task.json",
    "date_understanding": "bigbench/benchmark_tasks/date_understanding/task.json",
    "navigate": "bigbench/benchmark_tasks/navigate/task.json",
}


GENERATED = ("wiki_cloze",)
CLOZE_MIN_CONTEXT = 20  # words before the target
CLOZE_CHOICES = 4


def _word(token: str) -> str:
    """A whitespace token without surrounding punctuation, or '' unless it is a plain word of 4+ letters."""
    w = token.strip(".,;:!?\"'()[]")
    return w if len(w) >= 4 and w.isalpha() else ""


def cloze_items(docs: list[str], seed: int = 0) -> list[dict]:
    """Last-word-of-a-sentence items, one per document that has one (LAMBADA's idea, with choices).

    In each document: the first sentence that ends at least ``CLOZE_MIN_CONTEXT`` words in, on a plain word
    of 4+ letters. Prompt: the document's words before that word; choices: the word and 3 other distinct
    plain words of the same document (so of the same topic), in an order drawn with ``seed`` and the item's
    index. Chance is 0.25; guessing by frequency or by topic does not help.
    """
    import random

    items = []
    for k, doc in enumerate(docs):
        words = doc.split()
        for i in range(CLOZE_MIN_CONTEXT, len(words)):
            target = _word(words[i])
            if target and words[i].endswith((".", "!", "?")):
                break
        else:
            continue
        others = sorted({w for w in map(_word, words) if w and w.lower() != target.lower()})
        if len(others) < CLOZE_CHOICES - 1:
            continue
        rng = random.Random(seed * 1_000_003 + k)
        choices = [target] + rng.sample(others, CLOZE_CHOICES - 1)
        rng.shuffle(choices)
        items.append({"prompt": " ".join(words[:i]), "choices": choices, "answer": choices.index(target)})
    return items


def generated_task(name: str) -> list[dict]:
    """Items of a generated built-in task (``GENERATED``)."""
    from .data import load_documents, split_documents

    _, evals = split_documents(load_documents(None))
    return cloze_items(evals)


def _sdist_url(name: str, version: str) -> str:
    """The sdist's download address, read from PyPI's simple index (the package registry pip uses)."""
    import re

    with urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60) as r:
        page = r.read().decode()
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].endswith(f"/{name}-{version}.tar.gz"):
            return href.split("#")[0]
    raise InputError(f"PyPI has no source distribution of {name}=={version} (any more); "
                     "use the built-in offline task: --task wiki_cloze")


def fetch_task_file(task: str) -> Path:
    """The cached ``task.json`` of a built-in task, streamed out of the bigbench sdist once."""
    from .assets import cache_dir, log

    dest = cache_dir() / "tasks" / f"{task}.json"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    member_suffix = BUILTIN[task]
    log(f"fetching {task} from the bigbench {BIGBENCH[1]} source distribution on PyPI (358 MB, streamed once)")
    try:
        with urllib.request.urlopen(_sdist_url(*BIGBENCH), timeout=600) as r, tarfile.open(fileobj=r, mode="r|gz") as tar:
            for m in tar:
                if m.name.endswith(member_suffix):
                    part = dest.with_suffix(".part")
                    part.write_bytes(tar.extractfile(m).read())
                    os.replace(part, dest)
                    return dest
    except OSError as e:
        raise InputError(f"could not fetch the bigbench task {task!r} from PyPI ({e}); check the network, "
                         "or use the built-in offline task: --task wiki_cloze")
    raise InputError(f"{member_suffix} not found in bigbench {BIGBENCH[1]}; use the built-in offline task: --task wiki_cloze")


def load_task(spec: str, limit: int | None = None) -> list[dict]:
    """Items ``{"prompt", "choices", "answer"}`` of a built-in task name or a ``task.json`` path."""
    if spec in GENERATED:
        items = generated_task(spec)
        return items[:limit] if limit else items
    path = fetch_task_file(spec) if spec in BUILTIN else Path(spec)
    if not path.exists():
        raise InputError(f"no such task: {spec!r}; give a BIG-bench task.json or one of {sorted(GENERATED + tuple(BUILTIN))}")
    try:
        task = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON ({e})")
    if "examples" not in task:
        raise InputError(f"{path} has no 'examples'; it is not a BIG-bench task.json (tasks with subtasks: give a subtask's file)")
    prefix = task.get("task_prefix", "")
    qp = task.get("example_input_prefix", "\nQ: ")
    ap = task.get("example_output_prefix", "\nA: ")
    items = []
    for ex in task["examples"]:
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        answer = max(range(len(choices)), key=lambda i: scores[choices[i]])
        items.append({"prompt": (prefix + qp + ex["input"] + ap).lstrip("\n"), "choices": choices, "answer": answer})
    if not items:
        raise InputError(f"{path} has no multiple-choice examples (target_scores)")
    return items[:limit] if limit else items
