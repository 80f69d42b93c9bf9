"""How much each (group, candidate) costs in accuracy: two cheap estimators, and real recipes.

- ``kl``: the change in output KL divergence on a held-out calibration slice when only that group is
  switched to the candidate (round-to-nearest on lmpress's grid), all else float. The float hidden
  states entering every block are kept, so a switch in block ``i`` re-runs blocks ``i..`` only.
- ``fisher``: a Fisher / Taylor estimate from one forward and backward pass of the float model on
  the slice's next-token loss, as NVIDIA ModelOpt's ``auto_quantize`` scores formats: for a linear
  with inputs ``X`` and output gradients ``G = dL/dY`` (per token, of the summed loss),
  ``score = 1/2 mean_t sum_o G[t, o]^2 ((X (Q(W) - W)^T)[t, o])^2``, the second-order change of the
  loss with the Fisher approximated by the squared gradients, per output element.
- :func:`recipe_kl`: the measured KL of a whole recipe (every group switched at once), the ground
  truth both estimators are held to (rank correlation) and scaled to (least squares).

All measure KL(float || switched) in nats per token, the mean over every position of the slice.
Pure torch; the model is changed only temporarily and restored exactly (weights are copied back).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import arch
from ..calib import capture
from ..errors import InputError
from ..quant.grid import fake_quantize, grid_params
from .candidates import Group


def rtn_weight(w: torch.Tensor, spec) -> torch.Tensor:
    """``w`` (out, in) rounded to the nearest point of ``spec``'s grid (min/max scales), float32;
    ``spec`` a ggml type name: llama.cpp's block grid of that type, round-to-nearest."""
    if isinstance(spec, str):
        from ..quant import ggml

        return ggml.dequantize(ggml.quantize(w.float(), spec))
    s, z = grid_params(w, spec)
    return fake_quantize(w, s, z, spec)


def group_specs(groups: list[Group], choice: dict[str, int], sym: bool = False) -> dict:
    """Layer name -> grid of each layer of the groups in ``choice`` (group name -> candidate index)."""
    return {n: g.candidates[choice[g.name]].spec(sym) for g in groups if g.name in choice for n in g.layers}


@contextmanager
def switched(model, specs: dict):
    """``model`` with each layer in ``specs`` (name -> GridSpec, None: float) round-to-nearest on its
    grid; every weight is restored on exit."""
    saved = {}
    try:
        for name, spec in specs.items():
            if spec is None:
                continue
            m = model.get_submodule(name)
            w = arch.linear_weight(m).detach()
            saved[name] = w.clone()
            arch.set_linear_weight(m, rtn_weight(w.float(), spec).to(w.dtype))
        yield model
    finally:
        for name, w in saved.items():
            arch.set_linear_weight(model.get_submodule(name), w)


@dataclass
class Reference:
    """The float model on one token slice: each block's input hidden states (per batch), the final
    hidden states, and the log-probabilities every switched model is compared with."""

    inputs: list[list[torch.Tensor]]  # [block][batch] (b, T, hidden); [n_blocks] = final hidden states
    extras: list[tuple]
    logp: list[torch.Tensor]  # [batch] (b, T, V)

    @property
    def tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x in self.logp)


def _block_forward(block, x, extra):
    args, kw = extra
    out = block(x, *args, **kw)
    return out[0] if isinstance(out, tuple) else out


def tail_logp(model, h: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (b, T, V) from the last block's output ``h`` (final norm, output head)."""
    spec = arch.spec_for(model)
    if spec.final_norm is None:
        raise InputError(f"lmpress plan needs to know the final norm of {type(model).__name__}; "
                         "supported: " + ", ".join(sorted(arch.SPECS)))
    h = model.get_submodule(spec.final_norm)(h)
    proj = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out", None)  # OPT
    if proj is not None:
        h = proj(h)
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, -1)


@torch.no_grad()
def reference(model, ids: torch.Tensor, batch_size: int = 2) -> Reference:
    """Run the float model block by block over ``ids`` (n, L), keeping every block's input."""
    x, extras = capture(model, ids, batch_size)
    inputs = [x]
    for block, extra in zip(arch.blocks(model), extras):
        x = [_block_forward(block, xb, extra) for xb in x]
        inputs.append(x)
    return Reference(inputs, extras, [tail_logp(model, h) for h in x])


def kl_each(ref_logp: torch.Tensor, logp: torch.Tensor) -> list[float]:
    """Summed KL(ref || model) over the positions of one batch, for each of the n models whose
    log-probabilities ``logp`` (n * b, T, V) stacks candidate-major; ``ref_logp`` (b, T, V).
    ``logp`` is overwritten (its buffer holds the terms: no other tensor of its size is made)."""
    n = logp.shape[0] // ref_logp.shape[0]
    terms = logp.view(n, *ref_logp.shape).neg_().add_(ref_logp).mul_(ref_logp.exp())  # (n, b, T, V)
    return terms.sum(-1).double().flatten(1).sum(1).tolist()


def kl_to(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Summed KL(ref || model) over the positions of one batch."""
    return kl_each(ref_logp, logp.clone())[0]


@torch.no_grad()
def kl_from(model, ref: Reference, start: int) -> float:
    """Mean KL(float || model) per token, running the model from block ``start`` on the float inputs."""
    blocks = arch.blocks(model)
    total = 0.0
    for bi, x in enumerate(ref.inputs[start]):
        for i in range(start, len(blocks)):
            x = _block_forward(blocks[i], x, ref.extras[i])
        total += kl_to(ref.logp[bi], tail_logp(model, x))
    return total / ref.tokens


# the batched kl estimator holds at most this many logits (float32: 512 MB; twice that at its peak,
# logits and log-probabilities) of stacked candidates at once: the default model's 12 candidates x 128
# positions x 49,152 tokens fit in one stack
MAX_LOGITS = 2**27


@contextmanager
def per_candidate(model, weights: dict[str, list[torch.Tensor]]):
    """``model`` in which each layer of ``weights`` (name -> n weights (out, in)) computes, for the k-th
    of n equal slices of its input batch, the linear with the k-th weight (and its own bias): n
    candidates of the layer run as one batch, candidate-major. Nothing is written into the model."""
    mods = {name: model.get_submodule(name) for name in weights}
    for name, m in mods.items():
        if not arch.is_dense_linear(m):
            raise InputError(f"the kl estimator switches plain float linear layers, but {name} is a "
                             f"{type(m).__name__}: plan from the uncompressed model")
    own = {name: m.__dict__.get("forward") for name, m in mods.items()}  # a forward set on the instance
    try:
        for name, m in mods.items():
            m.forward = _sliced_linear(weights[name], getattr(m, "bias", None))  # an instance attribute
        yield model
    finally:
        for name, m in mods.items():
            if own[name] is not None:
                m.forward = own[name]
            elif "forward" in m.__dict__:
                del m.forward


def _sliced_linear(ws: list[torch.Tensor], bias):
    def forward(x):  # (n * b, T, in) -> (n * b, T, out)
        return torch.cat([torch.nn.functional.linear(xk, w, bias) for xk, w in zip(x.chunk(len(ws)), ws)])
    return forward


def candidate_weights(model, group: Group, idx: list[int], sym: bool = False) -> dict[str, list[torch.Tensor]]:
    """Layer name -> the round-to-nearest weight (out, in) of each candidate ``idx`` of ``group``."""
    out = {}
    for name in group.layers:
        w = arch.linear_weight(model.get_submodule(name)).detach()
        out[name] = [rtn_weight(w.float(), group.candidates[ci].spec(sym)).to(w.dtype) for ci in idx]
    return out


def _kl_stacked(model, ref: Reference, bi: int, start: int, weights: dict) -> list[float]:
    """Summed KL over batch ``bi`` of each candidate in ``weights``, all run as one batch from block ``start``."""
    blocks = arch.blocks(model)
    n = len(next(iter(weights.values())))
    x = ref.inputs[start][bi].repeat(n, 1, 1)  # (n * b, T, hidden), candidate-major
    with per_candidate(model, weights):
        for i in range(start, len(blocks)):
            x = _block_forward(blocks[i], x, ref.extras[i])
        return kl_each(ref.logp[bi], tail_logp(model, x))


def even_split(n: int, most: int) -> int:
    """A stack size that holds ``n`` in the fewest stacks of at most ``most``, as even as one size allows
    (12, 10 -> 6: stacks of 6 and 6, not 10 and 2)."""
    return -(-n // -(-n // most))


@torch.no_grad()
def kl_scores(model, group: Group, ref: Reference, sym: bool = False) -> list[float]:
    """The ``kl`` estimator of every candidate of ``group`` (0 for float): :func:`kl_from` of each
    candidate switched alone, with the candidates stacked along the batch (at most :data:`MAX_LOGITS`
    logits at once), so every block runs once per stack instead of once per candidate."""
    start = len(arch.blocks(model)) if group.block is None else group.block
    idx = [ci for ci, c in enumerate(group.candidates) if c.bits is not None]
    weights = candidate_weights(model, group, idx, sym)
    sums = [0.0] * len(idx)
    for bi, logp in enumerate(ref.logp):
        per = even_split(len(idx), max(1, MAX_LOGITS // logp.numel()))
        for s in range(0, len(idx), per):
            part = _kl_stacked(model, ref, bi, start, {n: w[s : s + per] for n, w in weights.items()})
            sums[s : s + per] = [a + b for a, b in zip(sums[s : s + per], part)]
    out = [0.0] * len(group.candidates)
    for ci, total in zip(idx, sums):
        out[ci] = total / ref.tokens
    return out


def recipe_kl(model, specs: dict, ref: Reference) -> float:
    """Measured KL of a whole recipe (layer name -> grid, every layer switched at once, round-to-nearest)."""
    with switched(model, specs):
        return kl_from(model, ref, 0)


def fisher_scores(model, groups: list[Group], ids: torch.Tensor, sym: bool = False, batch_size: int = 2,
                  progress: bool = False) -> dict[str, list[float]]:
    """The ``fisher`` estimator of every (group, candidate): one forward and backward pass per batch of
    ``ids`` (n, L), scores accumulated in the backward hooks (nothing per token is kept)."""
    from ..progress import bar

    layer_cands = {n: g for g in groups for n in g.layers}
    acc = {n: torch.zeros(len(g.candidates), dtype=torch.float64) for n, g in layer_cands.items()}
    xs: dict[str, torch.Tensor] = {}

    def deltas(name):  # (Q(W) - W) of each candidate, made when needed (all of them at once would not fit)
        w = arch.linear_weight(model.get_submodule(name)).detach().float()
        for c in layer_cands[name].candidates:
            yield None if c.bits is None else rtn_weight(w, c.spec(sym)) - w

    def fwd(name):
        def hook(_m, args, _out):
            xs[name] = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
        return hook

    def bwd(name):
        def hook(_m, _gin, gout):
            g2 = gout[0].detach().float().reshape(-1, gout[0].shape[-1]) ** 2  # (tokens, out)
            x = xs.pop(name)
            for ci, dw in enumerate(deltas(name)):
                if dw is not None:
                    acc[name][ci] += 0.5 * float(((x @ dw.T) ** 2 * g2).sum())
        return hook

    mods = {n: model.get_submodule(n) for n in layer_cands}
    handles = [m.register_forward_hook(fwd(n)) for n, m in mods.items()]
    handles += [m.register_full_backward_hook(bwd(n)) for n, m in mods.items()]
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        n_tok = 0
        for s in bar(range(0, len(ids), batch_size), desc="fisher", enabled=progress):
            batch = ids[s : s + batch_size]
            e = emb(batch).detach().requires_grad_(True)
            logits = model(inputs_embeds=e, use_cache=False).logits.float()  # (b, T, V)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     batch[:, 1:].reshape(-1), reduction="sum")
            loss.backward()  # gradients of the summed loss: per-token G
            n_tok += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return {g.name: [float(sum(acc[n][ci] for n in g.layers)) / n_tok for ci in range(len(g.candidates))]
            for g in groups}
