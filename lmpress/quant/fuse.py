"""One kernel call per shared input under ``torch.compile``: products that read the same activation
(q, k, v after the input norm; gate, up after the post-attention norm) become one
``lmpress::qmatmul_many`` call.

:class:`FuseSharedInputs` is an Inductor post-grad graph pass. It groups the
``lmpress::qmatmul`` nodes of a traced graph by their input node, bit width and group size, and
replaces each group of two or more by one ``qmatmul_many`` node whose outputs take the place of
the single products. The fused kernel prepares x once and runs one parallel loop over the rows of
all matrices of the group; each output row is computed by the same code as in ``qmatmul``, so the
results are bit-identical to the unfused graph. The pass needs no architecture knowledge and
touches no module: the packed weights stay where they are (no concatenated copy).

Example::

    step = torch.compile(model.forward, options=compile_options())
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass


def compile_options() -> dict:
    """Inductor options for compiling a model with lmpress's packed linears: the fusion pass, and no
    size / alignment asserts in the generated wrapper (one Python call per graph input and extern
    output, ~800 per decoded token of a 30-layer model, each checking what tracing established)."""
    return {"post_grad_custom_post_pass": FuseSharedInputs(), "size_asserts": False, "alignment_asserts": False}


class FuseSharedInputs(CustomGraphPass):
    """Inductor post-grad pass: group ``lmpress::qmatmul`` nodes that share an input into
    ``lmpress::qmatmul_many`` (see the module docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for nodes in shared_input_groups(graph):
            fuse_group(graph, nodes)
        graph.eliminate_dead_code()

    def uuid(self) -> str:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def shared_input_groups(graph: torch.fx.Graph) -> list[list[torch.fx.Node]]:
    """``qmatmul`` nodes with the same x node, bits and group size, in graph order; groups of 2+."""
    if not hasattr(torch.ops.lmpress, "qmatmul"):  # the extension is not loaded: nothing to fuse
        return []
    single = torch.ops.lmpress.qmatmul.default
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is single:
            x, _, _, _, bits, group_size, *_ = _args(node)
            groups.setdefault((x, bits, group_size), []).append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def fuse_group(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Replace ``nodes`` (one shared x) by one ``qmatmul_many`` node and ``getitem`` of its outputs."""
    import operator

    args = [_args(n) for n in nodes]  # (x, packed, scales, zeros, bits, group_size, out_features, bias)
    x, _, _, _, bits, group_size, _, _ = args[0]
    with graph.inserting_before(nodes[0]):
        many = graph.call_function(
            torch.ops.lmpress.qmatmul_many.default,
            (x, [a[1] for a in args], [a[2] for a in args], [a[3] for a in args], bits, group_size,
             [a[6] for a in args], [a[7] for a in args]),
        )
        many.meta["val"] = [n.meta["val"] for n in nodes]
        for i, node in enumerate(nodes):
            item = graph.call_function(operator.getitem, (many, i))
            item.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(item)
    for node in nodes:
        graph.erase_node(node)


def _args(node: torch.fx.Node) -> tuple:
    """The eight arguments of a ``qmatmul`` node, defaults filled in."""
    names = ("x", "packed", "scales", "zeros", "bits", "group_size", "out_features", "bias")
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    return tuple(values.get(n) for n in names)
