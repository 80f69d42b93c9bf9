"""lmpress.stats: the input statistics every layer-wise method reads, and the damped Cholesky."""

import dataclasses

import pytest
import torch
from tiny import tiny_model

from lmpress import arch, calib, stats
from lmpress import recipe as rc
from lmpress.errors import InputError


def test_input_stats_equal_the_sums_over_all_rows():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 12, generator=g) for n in (5, 9, 3)]
    X = torch.cat(xs)
    st = stats.InputStats("xtx", "sq", "abs", rows=6, stride=2)
    for x in xs:
        st(x)
    assert st.n == 17
    torch.testing.assert_close(st.xtx, X.T @ X)
    torch.testing.assert_close(st.hessian, 2 * X.T @ X / 17)
    torch.testing.assert_close(st.sq_sum, (X * X).sum(0))
    torch.testing.assert_close(st.mean_abs, X.abs().mean(0))
    assert torch.equal(st.sample, torch.cat([x[::2] for x in xs])[:6])
    s = torch.rand(12) + 0.5
    st.divide_inputs(s)  # as if every row had been x / s
    torch.testing.assert_close(st.xtx, (X / s).T @ (X / s))
    torch.testing.assert_close(st.sq_sum, ((X / s) ** 2).sum(0))
    with pytest.raises(ValueError, match="not"):
        stats.InputStats("mean")


def test_bf16_inputs_get_float32_products_unless_asked_not_to():
    x = torch.randn(64, 8).to(torch.bfloat16)
    up, keep = stats.InputStats("xtx"), stats.InputStats("xtx", upcast=False)
    up(x)
    keep(x)
    assert up.xtx.dtype == keep.xtx.dtype == torch.float32
    assert torch.equal(up.xtx, x.float().T @ x.float())
    assert torch.equal(keep.xtx, (x.T @ x).float())
    assert not torch.equal(up.xtx, keep.xtx)  # the bf16 product is rounded


def test_collect_shares_one_accumulator_per_input_group():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 8))
    seen = {}

    def fn(bctx):
        names = list(bctx.linears)
        seen[bctx.index] = stats.collect(bctx, names, lambda: stats.InputStats("sq"))

    calib.walk_blocks(model, ids, fn, progress=False, blocks_to_visit=[0])
    st = seen[0]
    assert st["self_attn.q_proj"] is st["self_attn.k_proj"] is st["self_attn.v_proj"]
    assert st["mlp.gate_proj"] is st["mlp.up_proj"] and st["mlp.down_proj"] is not st["mlp.up_proj"]
    assert len({id(v) for v in st.values()}) == 4 and all(v.n == 16 for v in st.values())


def test_damped_cholesky_raises_damp_only_when_needed():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 10, generator=g, dtype=torch.float64)
    H = X.T @ X
    L, used = stats.damped_cholesky(H, 0.01)
    assert used == 0.01
    torch.testing.assert_close(L @ L.T, H + 0.01 * H.diagonal().mean() * torch.eye(10, dtype=H.dtype))
    U, used = stats.damped_cholesky(H, 0.01, inverse=True)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H + 0.01 * H.diagonal().mean() * torch.eye(10, dtype=H.dtype)))
    bad = H.clone()
    bad[2, 2] = -0.5 * bad[2, 2]
    _, used = stats.damped_cholesky(bad, 0.01)
    assert used > 0.01
    _, used0 = stats.damped_cholesky(torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)), 0.0)
    assert 0 < used0 <= 1e-9  # damp 0 on a singular H: the smallest raise that factors it
    with pytest.raises(InputError, match="GPTQ.*singular"):
        stats.damped_cholesky(-torch.eye(3), 0.01, method="GPTQ")


def test_without_dead_marks_never_active_inputs_and_copies():
    H = torch.diag(torch.tensor([2.0, 0.0, 3.0]))
    H2, dead = stats.without_dead(H)
    assert dead.tolist() == [False, True, False] and H2[1, 1] == 1 and H[1, 1] == 0


def test_every_config_names_its_family_and_method():
    families = {"rtn": "quant", "gptq": "quant", "awq": "quant", "magnitude": "prune", "wanda": "prune",
                "sparsegpt": "prune", "prune-width": "prune", "prune-depth": "prune", "svd": "lowrank",
                "asvd": "lowrank", "svd-llm": "lowrank", "dsformer": "lowrank"}
    for name, family in families.items():
        cls = rc.config_class(name)
        assert (cls.method, cls.family) == (name, family)


def test_one_name_per_setting():
    fields = {name: {f.name for f in dataclasses.fields(rc.config_class(name))} for name in ("gptq", "sparsegpt", "wanda", "svd-llm", "dsformer")}
    assert {"damp", "block_size", "sequential", "calib_dtype"} <= fields["gptq"] & fields["sparsegpt"]
    assert "damp" in fields["svd-llm"] & fields["dsformer"]
    common = {"sparsity", "pattern", "allocation", "owl_lambda", "owl_m", "sequential", "batch_size", "calib_dtype"}
    assert common <= fields["wanda"] & fields["sparsegpt"]
    for old in ("dampening", "blocksize", "true_sequential"):
        assert all(old not in f for f in fields.values())
    with pytest.raises(InputError, match="batch_size"):
        rc.make_config("wanda", batch_size=0)
    with pytest.raises(InputError, match="damp"):
        rc.make_config("gptq", damp=1.5)


def test_arch_helpers():
    from transformers.pytorch_utils import Conv1D

    conv, lin = Conv1D(6, 4), torch.nn.Linear(4, 6)
    assert arch.is_conv1d(conv) and not arch.is_conv1d(lin)
    assert arch.is_dense_linear(conv) and arch.is_dense_linear(lin) and not arch.is_dense_linear(torch.nn.LayerNorm(4))
    assert arch.linear_weight(conv).shape == arch.linear_weight(lin).shape == (6, 4)
    gemma, llama = tiny_model("gemma3"), tiny_model("llama")
    assert arch.norm_adds_one(gemma.model.layers[0].input_layernorm)
    assert not arch.norm_adds_one(llama.model.layers[0].input_layernorm)
    assert arch.width_spec(llama, hidden=True).hidden and not arch.width_spec(gemma).hidden
    with pytest.raises(InputError, match="hidden-channel pruning"):
        arch.width_spec(gemma, hidden=True)
    with pytest.raises(InputError, match="width pruning supports"):
        arch.width_spec(tiny_model("gpt2"))
