"""lmpress's multiple-choice tasks through EleutherAI's lm-evaluation-harness, on the in-memory model.

The harness loads task data from the Hugging Face hub by default; here each task lmpress can read
(``tasks.load_task``: a built-in BIG-bench task or a ``task.json`` path) is written as a local JSONL file
plus a generated YAML task (``dataset_path: json``) in a temporary folder, and run through the harness's
``HFLM`` wrapper around the model as it is (lmpress's own layers included). Optional: ``pip install
'lmpress[lm-eval]'``. Python::

    from lmpress.lmeval import evaluate_lm_eval
    evaluate_lm_eval(model, tokenizer, "social_iqa", limit=200)  # {"lm_eval_acc": ..., ...}

The items are written so that the harness scores what ``evaluate.multiple_choice`` scores (the same
figures both ways; see ``harness_items``).
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

from .errors import InputError


def harness_items(items: list[dict], bos_text: str | None) -> list[dict]:
    """Rows of the JSONL file: ``{"prompt", "choices", "answer"}`` in lmpress's scoring convention.

    ``evaluate.multiple_choice`` scores ``log p(" " + choice.strip() | BOS + prompt.rstrip())`` with no
    other special tokens, and normalises by ``len(" " + choice.strip())`` characters. The harness scores
    ``log p(target_delimiter + choice | context)`` and normalises by ``len(choice)``, so the choices carry
    their leading space themselves (the YAML's ``target_delimiter`` is empty) and both lengths agree.
    The BOS token is written as text at the start of the prompt: the harness then encodes that string
    with ``add_special_tokens=False`` (its rule for a context that starts with BOS), one BOS as in lmpress.
    """
    return [{"prompt": (bos_text or "") + it["prompt"].rstrip(),
             "choices": [" " + c.strip() for c in it["choices"]],
             "answer": int(it["answer"])} for it in items]


def task_config(name: str, data_file: Path, cache: Path) -> dict:
    """The harness's YAML task over a local JSONL file: zero-shot multiple choice, acc and acc_norm."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",  # names of the rows' fields
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": "",  # the choices start with their space (see harness_items)
        "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }


def task_name(spec: str) -> str:
    """A harness task name for a built-in task or a task.json path, prefixed so that it cannot clash."""
    p = Path(spec)
    stem = p.parent.name if p.name == "task.json" else p.stem
    return "lmpress_" + (re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "task")


def _write_task(folder: Path, name: str, rows: list[dict]) -> None:
    import json

    import yaml

    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task_config(name, data, folder / "datasets")))


def _harness():
    """lm_eval's pieces and version, or an InputError saying how to install it."""
    try:
        from importlib.metadata import version

        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise InputError(f"--lm-eval needs lm-evaluation-harness ({e}); pip install 'lmpress[lm-eval]'")
    return simple_evaluate, HFLM, TaskManager, version("lm_eval")


def evaluate_lm_eval(model, tokenizer, task: str, limit: int = 200, *, batch_size: int = 8) -> dict:
    """Zero-shot accuracy of ``model`` on ``task`` (built-in name or task.json path) by lm-evaluation-harness.

    ``limit``: the first N items (0 or None: all). ``batch_size``: the harness's batch size.
    """
    simple_evaluate, HFLM, TaskManager, lm_eval_version = _harness()
    from .tasks import load_task

    items = load_task(task, limit)
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
    name = task_name(task)
    # HFLM sets a pad token on the tokenizer it is given: give it a copy, the caller's stays as it was
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, add_bos_token=False)
    with tempfile.TemporaryDirectory(prefix="lmpress-lmeval-") as tmp:
        _write_task(Path(tmp), name, harness_items(items, bos))
        out = simple_evaluate(model=lm, tasks=[name], num_fewshot=0, bootstrap_iters=0, log_samples=False,
                              task_manager=TaskManager(include_path=tmp, include_defaults=False))
    res = out["results"][name]
    return {"lm_eval_task": task, "lm_eval_acc": res["acc,none"], "lm_eval_acc_norm": res["acc_norm,none"],
            "lm_eval_items": len(items), "lm_eval_version": lm_eval_version}
