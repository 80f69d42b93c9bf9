"""Training the fp16 block scales of llama.cpp-grid layers (distill train: scales): the fields read and
written exactly, the weight rebuilt from them, codes kept, the teacher's KL lowered, clear refusals."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmpress.errors import InputError  # noqa: E402
from lmpress.quant import ggml  # noqa: E402
from lmpress.quant.qlinear import _ggml_values  # noqa: E402
from tests.test_gguf_solve import _compress, setup  # noqa: E402,F401


@pytest.mark.parametrize("gtype", sorted(ggml.FP16_FIELDS))
def test_fp16_fields_read_write_and_rebuild_the_weight(gtype):
    W = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    bq = ggml.fit(W, gtype)
    raw = torch.from_numpy(ggml.encode(bq))
    d, m = ggml.fp16_fields(raw, gtype)
    assert torch.equal(d, bq.d.float()) and (m is None) == (bq.m is None)
    assert m is None or torch.equal(m, bq.m.float())
    assert torch.equal(ggml.with_fp16_fields(raw, gtype, d, m), raw)
    A, B = ggml.fp16_bases(raw, gtype, W.shape)
    n = W.shape[1] // d.shape[1]
    rebuilt = d.repeat_interleave(n, 1) * A + (0 if m is None else m.repeat_interleave(n, 1) * B)
    assert torch.equal(rebuilt, _ggml_values(raw, gtype, W.shape))
    # a changed field changes only its own two bytes, and the weight by the basis
    d2 = d.clone()
    d2[0, 0] = d[0, 0] * 2
    raw2 = ggml.with_fp16_fields(raw, gtype, d2, m)
    diff = np.nonzero((raw2 != raw).numpy().ravel())[0]
    assert 1 <= len(diff) <= 2 and diff.max() - diff.min() <= 1
    rebuilt2 = d2.repeat_interleave(n, 1) * A + (0 if m is None else m.repeat_interleave(n, 1) * B)
    assert torch.equal(rebuilt2, _ggml_values(raw2, gtype, W.shape))


def _kl_on(model, teacher, ids):
    with torch.no_grad():
        lq = torch.log_softmax(teacher(ids).logits.float(), -1)
        lp = torch.log_softmax(model(ids).logits.float(), -1)
    return (lq.exp() * (lq - lp)).sum(-1).mean().item()


@pytest.mark.parametrize("gtype", ["Q4_0", "Q4_K_S"])
def test_trained_scales_keep_the_codes_and_lower_the_teachers_kl(setup, tmp_path, gtype):
    import copy

    from lmpress.data import DataConfig, prepare
    from lmpress.formats.gguf import solved_layers
    from lmpress.io import load_model

    model, tok, text = setup
    teacher = copy.deepcopy(model)
    base = _compress(setup, "gptq", f"gguf:{gtype}", None)
    tune = dict(train="scales", data="calib", seq_len=64, tokens=64 * 16, batch_size=1, lr=0.002, grad_clip=0.0, warmup=0.0)
    from lmpress.api import compress
    from lmpress.recipe import make_config

    data = DataConfig(corpus=text, calib_samples=4, calib_len=64, eval_tokens=64)
    out = tmp_path / "m.gguf"
    tuned, report = compress(model, [make_config("gptq"), make_config("distill", **tune)], tok, data=data, out=out,
                             format=f"gguf:{gtype}", measure=False, progress=False)
    calib, _ = prepare(tok, data, need_eval=False)
    assert _kl_on(tuned, teacher, calib) < 0.9 * _kl_on(base, teacher, calib)
    a, b = solved_layers(base), solved_layers(tuned)
    changed = 0
    for name, layer in a.items():
        if name == "model.embed_tokens":
            assert torch.equal(layer.raw, b[name].raw)  # not a linear: not trained
            continue
        d, m = ggml.fp16_fields(layer.raw, layer.gtype)
        same = ggml.with_fp16_fields(b[name].raw, layer.gtype, d, m)
        assert torch.equal(same, layer.raw), name  # everything but the fp16 fields is GPTQ's
        changed += not torch.equal(b[name].raw, layer.raw)
    assert changed >= len(a) - 1
    loaded, _ = load_model(out)  # the file holds the trained fields
    ids = calib[:1]
    torch.testing.assert_close(loaded(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)


def test_scale_training_refuses_what_it_cannot_do(setup):
    from lmpress.distill.engine import DistillConfig

    with pytest.raises(InputError, match="has none"):
        _compress(setup, "distill", "auto", None, train="scales", seq_len=64, tokens=64)
    with pytest.raises(InputError, match="seq_len=32"):
        from lmpress.api import compress
        from lmpress.data import DataConfig
        from lmpress.recipe import make_config

        model, tok, text = setup
        compress(model, [make_config("gptq"), make_config("distill", train="scales", data="calib", seq_len=32, tokens=32)],
                 tok, data=DataConfig(corpus=text, calib_samples=4, calib_len=64, eval_tokens=64), format="gguf:Q4_0",
                 measure=False, progress=False)
    with pytest.raises(ValueError, match="qat_bits"):
        DistillConfig(train="scales", qat_bits=4)
    with pytest.raises(ValueError, match="train must be"):
        DistillConfig(train="codes")


def test_trained_packed_scales_keep_codes_and_zeros_and_lower_the_kl(setup, tmp_path):
    import copy

    from lmpress.api import compress
    from lmpress.data import DataConfig, prepare
    from lmpress.io import load_model
    from lmpress.quant.qlinear import QuantLinear
    from lmpress.recipe import make_config

    model, tok, text = setup
    teacher = copy.deepcopy(model)
    data = DataConfig(corpus=text, calib_samples=4, calib_len=64, eval_tokens=64)
    gptq = make_config("gptq", bits=3, group_size=64, head_bits=8)
    base, _ = compress(copy.deepcopy(model), [gptq], tok, data=data, measure=False, progress=False)
    tune = make_config("distill", train="scales", data="calib", seq_len=64, tokens=64 * 16, batch_size=1, lr=0.002,
                       grad_clip=0.0, warmup=0.0)
    out = tmp_path / "out"
    tuned, _ = compress(model, [gptq, tune], tok, data=data, out=out, measure=False, progress=False)
    calib, _ = prepare(tok, data, need_eval=False)
    assert _kl_on(tuned, teacher, calib) < 0.9 * _kl_on(base, teacher, calib)
    a = {n: m for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    b = {n: m for n, m in tuned.named_modules() if isinstance(m, QuantLinear)}
    assert a.keys() == b.keys() and "lm_head" in a  # the 8-bit head trains too
    for n in a:
        assert torch.equal(a[n].qweight, b[n].qweight) and torch.equal(a[n].zeros, b[n].zeros), n
    assert sum(not torch.equal(a[n].scales, b[n].scales) for n in a) == len(a)
    loaded, _ = load_model(out)  # the folder holds the trained scales
    torch.testing.assert_close(loaded(calib[:1]).logits, tuned(calib[:1]).logits, atol=1e-4, rtol=1e-4)
