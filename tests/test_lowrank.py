"""Low-rank factorization: SVD / ASVD / SVD-LLM / DSFormer math, layers, budgets, save and load."""

import pytest
import torch
from test_cli import _tok
from tiny import tiny_model
from torch import nn

from lmpress import arch
from lmpress.counts import param_counts
from lmpress import recipe as rc
from lmpress.errors import InputError
from lmpress.io import load_model
from lmpress.lowrank import factor
from lmpress.lowrank.dsformer import layer_bytes, shape_for_budget
from lmpress.lowrank.layers import DenseSparseLinear, LowRankLinear

IDS = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _correlated(out_f=48, in_f=32, tokens=400, seed=0):
    """A weight and inputs with strongly unequal, correlated channels (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) * torch.logspace(0.5, -2, in_f)  # (in, in)
    X = torch.randn(tokens, in_f, generator=g) @ mix.T  # (tokens, in)
    X[:, :3] *= 20  # a few outlier channels
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    return W, X.double()


def test_full_rank_reproduces_the_layer():
    W, X = _correlated()
    H = X.T @ X
    for S in (None, factor.asvd_scaling(X.abs().mean(0)), factor.cholesky_whitening(H, 0.0)):
        U, V = factor.truncate(W, S, min(W.shape))
        torch.testing.assert_close(U @ V, W, rtol=0, atol=1e-10)
    lin = nn.Linear(32, 48)
    U, V = factor.truncate(lin.weight.detach(), None, 32)
    layer = LowRankLinear.from_factors(U, V, lin.bias.detach())
    x = torch.randn(5, 7, 32)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)


def test_whitened_truncation_never_worse_than_svd_on_the_outputs():
    for seed in range(3):
        W, X = _correlated(seed=seed)
        H = X.T @ X
        S = factor.cholesky_whitening(H, 0.0)
        for r in (1, 2, 4, 8, 16, 24, 31):
            U, V = factor.truncate(W, None, r)
            e_svd = factor.output_error(W, U @ V, H)
            U, V, sigma = factor.truncate_with_spectrum(W, S, r)
            e_llm = factor.output_error(W, U @ V, H)
            assert e_llm <= e_svd * (1 + 1e-9), (seed, r, e_llm, e_svd)
            # SVD-LLM Theorem 3.2: the output error is the energy of the dropped whitened singular values
            assert e_llm == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-6)
        U, V = factor.truncate(W, S, 8)
        U0, V0 = factor.truncate(W, None, 8)
        assert factor.output_error(W, U @ V, H) < 0.5 * factor.output_error(W, U0 @ V0, H)  # by a wide margin


def test_factored_parameter_counts_add_up():
    lr = LowRankLinear(in_features=40, out_features=24, rank=5, bias=True)
    assert lr.logical_numel() == 5 * (40 + 24) + 24
    ds = DenseSparseLinear(in_features=40, out_features=24, k=12, s=4, bias=False)
    assert ds.logical_numel() == 12 * 40 + 24 * 4
    assert ds.indices.dtype == torch.uint8 and ds.stored_bytes() == layer_bytes(24, 40, 12, 4) == 4 * (480 + 96) + 96
    assert DenseSparseLinear(8, 8, 300, 2).indices.dtype == torch.int16
    model = tiny_model("llama")
    dense = param_counts(model)
    info = rc.apply(model, rc.make_config("svd", ratio=0.5), rc.RunContext(progress=False))
    after = param_counts(model)
    ranks = {n: v["rank"] for n, v in info["per_layer"].items()}
    expected = 0
    for name, r in ranks.items():
        m = model.get_submodule(name)
        if r is None:
            expected += m.weight.numel()
        else:
            assert isinstance(m, LowRankLinear) and m.rank == r and m.U.weight.shape[1] == m.V.weight.shape[0] == r
            expected += m.logical_numel()
    assert after.linear == expected == info["params_kept"] <= 0.5 * dense.linear
    assert after.embedding == dense.embedding and after.other == dense.other
    # the factors are plain linears: later recipe steps (quantization, distillation) see and change them
    assert any(n.endswith("q_proj.V") for n in arch.compressible_linears(model))


def test_rank_allocation_respects_the_budget():
    shapes = [(64, 64), (128, 64), (64, 128), (32, 64)]
    spectra = [torch.linspace(1, 0.01, min(s)) ** p for s, p in zip(shapes, (1, 4, 0.5, 8))]
    total = sum(o * i for o, i in shapes)
    for how in ("uniform", "energy"):
        for keep in (0.05, 0.3, 0.6, 0.9, 1.0):
            ranks = factor.allocate_ranks(spectra, shapes, int(keep * total), how)
            assert factor.factored_params(ranks, shapes) <= keep * total and min(ranks) >= 1
            if how == "energy" and keep == 0.6:
                assert len(set(ranks)) > 1  # not one rank everywhere: the steep spectrum gets less
                assert ranks[3] < ranks[2]
    for how in ("uniform", "energy"):  # ranks in multiples (for a quantizer's groups) still fit
        ranks = factor.allocate_ranks(spectra, shapes, int(0.5 * total), how, multiple=8)
        assert factor.factored_params(ranks, shapes) <= 0.5 * total
        assert all(r % 8 == 0 or r >= factor.dense_rank(o, i) for r, (o, i) in zip(ranks, shapes))
    assert factor.allocate_ranks(spectra, shapes, total, "energy") == [factor.dense_rank(o, i) for o, i in shapes]
    with pytest.raises(ValueError, match="outside"):
        factor.allocate_ranks(spectra, shapes, 10, "energy")


def test_energy_allocation_beats_uniform_on_total_relative_error():
    shapes = [(64, 64)] * 3
    spectra = [torch.linspace(1, 0.01, 64) ** p for p in (0.2, 2, 6)]
    budget = int(0.3 * sum(o * i for o, i in shapes))

    def err(ranks):
        return sum(float((s[r:] ** 2).sum() / (s ** 2).sum()) for s, r in zip(spectra, ranks))

    assert err(factor.allocate_ranks(spectra, shapes, budget, "energy")) < err(factor.allocate_ranks(spectra, shapes, budget, "uniform"))


def test_dsformer_full_basis_and_density_reproduce_w():
    W, X = _correlated(out_f=24, in_f=16)
    for H in (None, X.T @ X):
        fit = factor.dense_sparse_factorize(W, 16, 16, H, iters=2, dtype=torch.float64)
        torch.testing.assert_close(fit.dense_coefficients() @ fit.basis, W, rtol=0, atol=1e-8)
    layer = DenseSparseLinear.from_factors(fit.basis.float(), fit.values.float(), fit.indices)
    x = torch.randn(3, 16)
    with torch.no_grad():  # the cached dense C, rebuilt when the values change
        torch.testing.assert_close(layer(x), x @ W.float().T, rtol=1e-4, atol=1e-4)
        layer.values.mul_(2)
        torch.testing.assert_close(layer(x), 2 * x @ W.float().T, rtol=1e-4, atol=1e-4)
    layer(x).sum().backward()  # training: gradients reach the coefficient values and the basis
    assert layer.values.grad.abs().sum() > 0 and layer.basis.grad.abs().sum() > 0


def test_dsformer_error_decreases_with_iterations_and_beats_its_init():
    W, X = _correlated(out_f=64, in_f=48, seed=1)
    H = X.T @ X
    fit = factor.dense_sparse_factorize(W, 24, 8, H, iters=6, damp=0.0, dtype=torch.float64)
    errs = fit.errors
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])) and errs[-1] < 0.9 * errs[0]
    C = fit.dense_coefficients()
    assert ((C != 0).sum(1) <= 8).all()
    assert factor.output_error(W, C @ fit.basis, H) == pytest.approx(errs[-1], rel=1e-6)
    weight_only = factor.dense_sparse_factorize(W, 24, 8, None, iters=6, dtype=torch.float64)
    aware_err = factor.output_error(W, C @ fit.basis, H)
    assert aware_err < factor.output_error(W, weight_only.dense_coefficients() @ weight_only.basis, H)


def test_dsformer_shape_fits_the_byte_budget():
    for o, i in ((576, 576), (1536, 576), (576, 1536), (192, 576)):
        for keep in (0.3, 0.6, 0.9):
            k, s = shape_for_budget(o, i, keep * 4 * o * i, density=0.5)
            assert layer_bytes(o, i, k, s) <= keep * 4 * o * i
            assert layer_bytes(o, i, k + 1, max(1, round(0.5 * (k + 1)))) > keep * 4 * o * i or k == min(o, i)


@pytest.mark.parametrize("method,options,kind", [
    ("svd", {"ratio": 0.7, "allocation": "uniform"}, "llama"),
    ("asvd", {"ratio": 0.7}, "gpt2"),
    ("svd-llm", {"ratio": 0.7}, "llama"),
    ("svd-llm", {"rank": 8, "allocation": "uniform"}, "opt"),
    ("dsformer", {"ratio": 0.7, "iters": 2}, "llama"),
    ("dsformer", {"k": 12, "s": 4, "iters": 1}, "qwen2"),
])
def test_methods_save_then_load_identical_logits(tmp_path, method, options, kind):
    from lmpress.io import save_model

    model = tiny_model(kind)
    with torch.no_grad():
        ref = model(IDS).logits
    cfg = rc.make_config(method, **options)
    info = rc.apply(model, cfg, rc.RunContext(calib=IDS, progress=False))
    assert info["layers_factored"] > 0 and info["kept_fraction"] <= 0.71
    with torch.no_grad():
        out = model(IDS).logits
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 1  # random tiny weights have flat spectra: large but bounded error
    save_model(model, tmp_path / "m", format="lmpress", recipe=[rc.to_dict(cfg)], tokenizer=_tok(tmp_path))
    again, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, out, rtol=0, atol=1e-6)
    assert param_counts(again).linear == param_counts(model).linear


def test_factorize_then_quantize_the_factors(tmp_path):
    """A recipe svd-llm -> rtn quantizes the two factors of each layer; save and load keep the logits."""
    from lmpress.io import save_model

    model = tiny_model("llama")
    recipe = [rc.make_config("svd-llm", ratio=0.6, rank_multiple=16, allocation="uniform"), rc.make_config("rtn", bits=4, group_size=16)]
    ctx = rc.RunContext(calib=IDS, progress=False)
    for cfg in recipe:
        rc.apply(model, cfg, ctx)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.rank % 16 == 0
    assert q.U.kind == "quant" and q.V.kind == "quant"
    save_model(model, tmp_path / "m", format="lmpress", recipe=[rc.to_dict(c) for c in recipe], tokenizer=_tok(tmp_path))
    again, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=1e-6)


def test_activation_aware_beats_plain_svd_on_a_model():
    """Same budget and allocation: SVD-LLM's logits are closer to the original than plain SVD's."""
    ref_model = tiny_model("llama")
    with torch.no_grad():
        ref = ref_model(IDS).logits
    errs = {}
    for method in ("svd", "svd-llm"):
        model = tiny_model("llama")
        rc.apply(model, rc.make_config(method, ratio=0.5, allocation="uniform"), rc.RunContext(calib=IDS, progress=False))
        with torch.no_grad():
            errs[method] = float((model(IDS).logits - ref).norm())
    assert errs["svd-llm"] < errs["svd"]


@pytest.mark.parametrize("method,options,match", [
    ("svd", {"ratio": 0}, "ratio must be in"),
    ("svd", {"ratio": 1.5}, "ratio must be in"),
    ("svd-llm", {"rank": 0}, "rank must be a positive integer"),
    ("asvd", {"ratio": 0.5, "rank": 4}, "not both"),
    ("svd", {"allocation": "magic"}, "allocation must be one of"),
    ("svd", {"rank": 12, "rank_multiple": 8}, "not a multiple"),
    ("dsformer", {"k": 4, "s": 8}, "cannot exceed k"),
    ("dsformer", {"ratio": 0.5, "k": 8}, "not both"),
    ("dsformer", {"density": 0}, "density"),
    ("svd", {"bits": 4}, "no option"),
])
def test_bad_options_are_clear_errors(method, options, match):
    with pytest.raises(InputError, match=match):
        rc.make_config(method, **options)


def test_bad_inputs_are_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="calibration data"):
        rc.apply(model, rc.make_config("svd-llm", ratio=0.5, allocation="uniform"), rc.RunContext(calib=None, progress=False))
    with pytest.raises(InputError, match="too small"):
        rc.apply(model, rc.make_config("svd", ratio=0.001), rc.RunContext(progress=False))
    rc.apply(model, rc.make_config("svd", ratio=0.5, allocation="uniform"), rc.RunContext(progress=False))
    with pytest.raises(InputError, match="no dense linear layers left"):
        rc.apply(model, rc.make_config("svd", ratio=0.5), rc.RunContext(progress=False))
    assert rc.make_config("svd").ratio == 0.8 and rc.make_config("dsformer", k=8).ratio is None


@pytest.mark.parametrize("method", ["rtn", "gptq", "wanda"])
def test_weight_rewriting_method_after_dsformer_is_a_clear_error(method):
    model = tiny_model("llama")
    ctx = rc.RunContext(calib=IDS, progress=False)
    rc.apply(model, rc.make_config("dsformer", ratio=0.8, iters=1), ctx)
    with pytest.raises(InputError, match="stores its weight in compressed form"):
        rc.apply(model, rc.make_config(method), ctx)
