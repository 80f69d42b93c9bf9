"""From a chosen allocation to a real model: the recipe (GPTQ with per-layer overrides), the
compression, and the measurement that confirms (or refutes) the budget."""

from __future__ import annotations

import re
from collections import Counter

from .candidates import Group

BASE_GROUP_SIZE = 64  # the recipe's group size: also the output head's (head_bits quantizes at it)


def recipe_for(groups: list[Group], choice, *, sym: bool = False, method: str = "gptq", gguf: str | None = None) -> list:
    """One method config that makes exactly ``choice`` (candidate index per group): the most common
    block setting is the base, every other group an override ``^<block>\\.(?:<layer>|...)$``, groups of one
    kind with one setting merged into one override (``layers\\.(1|5|9)\\.``). ``gguf`` (a file type): a
    GGUF plan, every group an override with its ggml type (the file type's rule gives the rest)."""
    from .. import recipe as rc

    picks = [(g, g.candidates[i]) for g, i in zip(groups, choice)]
    blocks = [(g, c) for g, c in picks if g.block is not None]
    base = Counter(c for _, c in blocks if c.bits is not None).most_common(1)
    base = base[0][0] if base and gguf is None else None
    merged: dict = {}
    for g, c in blocks:
        if c == base:
            continue
        prefix, _, _ = g.layers[0].rpartition(f".{g.block}.")
        tails = tuple(n.split(f"{prefix}.{g.block}.", 1)[1] for n in g.layers)
        merged.setdefault((prefix, tails, c), []).append(g.block)
    overrides = []
    for (prefix, tails, c), idx in sorted(merged.items(), key=lambda kv: (kv[0][1], kv[1])):
        alt = "|".join(re.escape(t) for t in tails)
        pat = f"^{re.escape(prefix)}\\.({'|'.join(map(str, sorted(idx)))})\\.({alt})$"
        overrides.append({"pattern": pat, "skip": True} if c.bits is None else {"pattern": pat, "gguf": c.gguf} if c.gguf
                         else {"pattern": pat, "bits": c.bits, "group_size": c.group_size})
    if gguf is not None:
        return [rc.make_config(method, gguf=gguf, overrides=tuple(overrides))]
    head = next((c for g, c in picks if g.block is None), None)
    fields = dict(bits=base.bits if base else 4, group_size=base.group_size if base else BASE_GROUP_SIZE, sym=sym,
                  overrides=tuple(overrides), head_bits=head.bits if head is not None else None)
    if fields["head_bits"] is not None and fields["group_size"] != BASE_GROUP_SIZE:
        # the head is quantized at the recipe's group size: make the base g64 and spell the rest out
        fields["overrides"] = tuple(overrides) + ({"pattern": ".", "bits": base.bits, "group_size": base.group_size},)
        fields["group_size"] = BASE_GROUP_SIZE
    return [rc.make_config(method, **fields)]

