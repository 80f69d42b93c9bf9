import pytest
import torch

from lmpress.errors import InputError
from lmpress.prune import masks


def _w(shape=(16, 32), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_topk_row_prunes_exact_count_per_row(sparsity):
    W = _w()
    keep = masks.topk_mask(W.abs(), sparsity, "row")
    assert (keep.sum(1) == 32 - masks.prune_count(32, sparsity)).all()


def test_topk_layer_prunes_exact_count_and_the_smallest():
    W = _w()
    keep = masks.topk_mask(W.abs(), 0.5, "layer")
    assert (~keep).sum() == 256
    assert W.abs()[keep].min() >= W.abs()[~keep].max()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_holds_in_every_block(n, m):
    W = _w((8, 64))
    keep = masks.nm_mask(W.abs(), n, m)
    assert (keep.reshape(8, -1, m).sum(-1) == n).all()
    assert masks.satisfies_nm(W * keep, n, m)
    assert not masks.satisfies_nm(W, n, m)


def test_nm_mask_rejects_width_not_multiple_of_m():
    with pytest.raises(InputError, match="divisible by 4"):
        masks.nm_mask(_w((4, 6)), 2, 4)


def test_wanda_scores_weight_columns_by_input_norm():
    W = torch.ones(2, 3)
    s = masks.wanda_scores(W, torch.tensor([1.0, 5.0, 0.0]))
    assert torch.equal(s, torch.tensor([[1.0, 5.0, 0.0]] * 2))


@pytest.mark.parametrize("bad", ["2", "4:2", "2:2", "0:4", "a:b", "2:4:8"])
def test_parse_pattern_rejects_bad(bad):
    with pytest.raises(ValueError, match="N:M"):
        masks.parse_pattern(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        masks.topk_mask(_w(), bad)


def test_owl_allocation_mean_spread_and_order():
    ratios = torch.tensor([0.01, 0.05, 0.02, 0.03])
    s = masks.owl_sparsities(ratios, 0.5, 0.08)
    assert abs(s.mean().item() - 0.5) < 1e-6
    assert abs((s.max() - s.min()).item() - 0.16) < 1e-6
    assert s.argmin() == ratios.argmax()  # most outliers: pruned least
    assert torch.allclose(masks.owl_sparsities(torch.full((3,), 0.02), 0.5, 0.08), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="lambda"):
        masks.owl_sparsities(ratios, 0.9, 0.2)


def test_outlier_ratio():
    s = torch.tensor([1.0] * 99 + [1000.0])
    assert masks.outlier_ratio(s, 5) == pytest.approx(0.01)
