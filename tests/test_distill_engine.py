"""The distillation engine on tiny models: it learns, resumes bit for bit, and scales to 2 processes."""

import argparse
import copy
import json
import os
import socket

import pytest
import torch
from torch import nn

from lmpress import recipe as rc
from lmpress.distill import engine as E
from lmpress.distill import qat
from lmpress.distill.engine import DistillConfig, distill
from lmpress.errors import InputError

L_SEQ = 16


def teacher_model():
    """A tiny Llama with sharpened weights, so that its predictions are far from uniform."""
    from tiny import tiny_model

    t = tiny_model("llama")
    with torch.no_grad():
        t.model.embed_tokens.weight.mul_(8)
        for p in t.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(3)
    return t


def truncated(t, keep=2):
    s = copy.deepcopy(t)
    s.model.layers = s.model.layers[:keep]
    s.config.num_hidden_layers = keep
    return s


def windows(n=32, L=L_SEQ, seed=0):
    return torch.randint(3, 256, (n, L), generator=torch.Generator().manual_seed(seed))


def kl_to(student, teacher, ids):
    from lmpress.distill.losses import forward_kl

    with torch.no_grad():
        return forward_kl(student(ids).logits, teacher(ids).logits).item()


def test_truncated_student_gets_closer_to_teacher():
    t = teacher_model()
    s = truncated(t)
    held_out = windows(16, 32, seed=9)
    before = kl_to(s, t, held_out)
    res = distill(s, t, DistillConfig(tokens=25 * 8 * L_SEQ, batch_size=8, seq_len=L_SEQ, lr=3e-3),
                  windows=windows(64), progress=False)
    after = kl_to(s, t, held_out)
    assert res["steps"] == 25 and res["loss_last"] < 0.6 * res["loss_first"]
    assert after < 0.7 * before, (before, after)
    assert res["tokens"] == 25 * 8 * L_SEQ and res["tokens_per_s"] > 0


OPTIONS = [dict(loss=n) for n in ("rkl", "jsd", "tv", "skl", "srkl", "tsld", "cakld", "ce")] + [
    dict(hidden_loss="mse", ce_weight=0.5), dict(hidden_loss="cosine", attention_weight=1.0),
    dict(loss="jsd", on_policy=1.0, prompt_len=4), dict(bf16=True, grad_accum=2, label_smoothing=0.1, temperature=2.0),
    dict(loss="tsld", qat_bits=2, qat_group_size=16, clip_lr=1e-2),
]


def test_every_loss_and_option_trains():
    t = teacher_model()
    w = windows(8)
    for opts in OPTIONS:
        s = truncated(t)
        res = distill(s, t, DistillConfig(tokens=2 * 4 * L_SEQ, batch_size=4, seq_len=L_SEQ, **opts), windows=w, progress=False)
        assert res["steps"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res["history"]), opts
        assert res["history"][0]["grad_norm"] > 0, opts
    assert res["history"][0]["on_policy"] is False and t.config._attn_implementation == "sdpa"


def test_hidden_loss_with_a_narrower_student_learns_a_projection():
    from transformers import LlamaConfig, LlamaForCausalLM

    t = teacher_model()
    torch.manual_seed(0)
    s = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    cfg = DistillConfig(tokens=3 * 4 * L_SEQ, batch_size=4, seq_len=L_SEQ, hidden_loss="mse", attention_weight=0.5)
    res = distill(s, t, cfg, windows=windows(8), progress=False)
    assert res["steps"] == 3 and "hidden" in res["history"][0] and "attention" in res["history"][0]


def test_topk_cache_trains_like_the_live_teacher(tmp_path):
    from lmpress.distill.data import TopKCache, cache_teacher_topk

    t = teacher_model()
    w = windows(8)
    cache = TopKCache(cache_teacher_topk(t, w, tmp_path / "c", k=256, progress=False))
    cfg = DistillConfig(tokens=3 * 4 * L_SEQ, batch_size=4, seq_len=L_SEQ, lr=1e-3)
    live = distill(truncated(t), t, cfg, windows=w, progress=False)
    cached = distill(truncated(t), None, cfg, cache=cache, progress=False)
    a, b = [r["loss"] for r in live["history"]], [r["loss"] for r in cached["history"]]
    assert all(abs(x - y) < 2e-3 * max(1.0, x) for x, y in zip(a, b)), (a, b)


def test_any_module_student():
    class Bigram(nn.Module):  # not a transformers model: ids -> logits
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(256, 32)
            self.head = nn.Linear(32, 256)

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))

    t = teacher_model()
    torch.manual_seed(0)
    s = Bigram()
    res = distill(s, t, DistillConfig(tokens=20 * 8 * L_SEQ, batch_size=8, seq_len=L_SEQ, lr=3e-2, on_policy=0.3,
                                      prompt_len=4), windows=windows(64), progress=False)
    losses = [r["loss"] for r in res["history"] if not r["on_policy"]]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]) and res["on_policy_steps"] > 0, losses
    with pytest.raises(InputError, match="need a Hugging Face model"):
        distill(Bigram(), t, DistillConfig(tokens=64, batch_size=4, seq_len=L_SEQ, hidden_loss="mse"),
                windows=windows(8), progress=False)


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    t = teacher_model()
    s0 = truncated(t)
    w = windows(16)
    cfg = dict(loss="jsd", tokens=6 * 4 * L_SEQ, batch_size=4, seq_len=L_SEQ, lr=2e-3, checkpoint_every=3,
               on_policy=0.5, prompt_len=4, hidden_loss="mse")
    full_s = copy.deepcopy(s0)
    full = distill(full_s, t, DistillConfig(checkpoint_dir=str(tmp_path / "a"), **cfg), windows=w, progress=False)

    def interrupt(rec):
        if rec["step"] == 3:  # 4 steps done, checkpoint at 3: the 4th step's work is lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(s0), t, DistillConfig(checkpoint_dir=str(tmp_path / "b"), **cfg), windows=w,
                progress=False, callback=interrupt)
    resumed_s = copy.deepcopy(s0)
    resumed = distill(resumed_s, t, DistillConfig(checkpoint_dir=str(tmp_path / "b"), **cfg), windows=w, progress=False)
    assert resumed["resumed_from"] == 3 and full["on_policy_steps"] > 0
    keys = ("loss", "kd", "hidden", "grad_norm", "lr", "on_policy")
    assert [[r[k] for k in keys] for r in resumed["history"]] == [[r[k] for k in keys] for r in full["history"]]
    for (n, a), b in zip(full_s.state_dict().items(), resumed_s.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(InputError, match="other settings"):
        distill(copy.deepcopy(s0), t, DistillConfig(checkpoint_dir=str(tmp_path / "b"), **{**cfg, "lr": 1e-3}),
                windows=w, progress=False)


def test_resume_refuses_a_checkpoint_written_for_other_models(tmp_path):
    """A checkpoint holds the fingerprints of the initial student and teacher: another model is an error."""
    from tiny import tiny_model

    t, w = teacher_model(), windows(8)
    s0 = truncated(t)
    cfg = DistillConfig(tokens=2 * 4 * L_SEQ, batch_size=4, seq_len=L_SEQ, lr=2e-3, checkpoint_dir=str(tmp_path / "ck"))
    first_s = copy.deepcopy(s0)
    first = distill(first_s, t, cfg, windows=w, progress=False)
    with pytest.raises(InputError, match=r"another student .*--checkpoint-dir.* delete .*ck to start over"):
        distill(truncated(tiny_model("llama", seed=1)), t, cfg, windows=w, progress=False)
    with pytest.raises(InputError, match="another teacher"):
        distill(copy.deepcopy(s0), tiny_model("llama", seed=1), cfg, windows=w, progress=False)
    resumed_s = copy.deepcopy(s0)
    resumed = distill(resumed_s, t, cfg, windows=w, progress=False)
    assert resumed["resumed_from"] == 2 and [r["loss"] for r in resumed["history"]] == [r["loss"] for r in first["history"]]
    assert all(torch.equal(a, b) for a, b in zip(first_s.state_dict().values(), resumed_s.state_dict().values()))
    ck_path = tmp_path / "ck" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=True)
    torch.save({**ck, "version": 1}, ck_path)  # written before the fingerprints existed
    with pytest.raises(InputError, match="older lmpress"):
        distill(copy.deepcopy(s0), t, cfg, windows=w, progress=False)


# ---- two processes (gloo) against one ----------------------------------------------------------------

DDP_CFG = dict(loss="tsld", hidden_loss="mse", tokens=3 * 4 * L_SEQ, batch_size=4, seq_len=L_SEQ, lr=2e-3)


def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        t = teacher_model()
        for fsdp in (False, True):
            s = truncated(t)
            res = distill(s, t, DistillConfig(fsdp=fsdp, **DDP_CFG), windows=windows(16), progress=False)
            if fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                sd = get_model_state_dict(s, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            else:
                sd = s.state_dict()
            if rank == 0:
                torch.save(sd, os.path.join(out_dir, f"state-{fsdp}.pt"))
                with open(os.path.join(out_dir, f"hist-{fsdp}.json"), "w") as f:
                    json.dump([r["loss"] for r in res["history"]] + [res["processes"]], f)
        dist.barrier()  # both ranks done before either tears gloo down (a rank exiting early aborted, rarely)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_two_process_ddp_and_fsdp_match_one_process(tmp_path):
    t = teacher_model()
    s = truncated(t)
    single = distill(s, t, DistillConfig(grad_accum=2, **DDP_CFG), windows=windows(16), progress=False)
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    ref = [r["loss"] for r in single["history"]]
    for fsdp in (False, True):
        hist = json.loads((tmp_path / f"hist-{fsdp}.json").read_text())
        assert hist[-1] == 2
        assert torch.allclose(torch.tensor(hist[:-1]), torch.tensor(ref), rtol=1e-5, atol=1e-6), (fsdp, hist, ref)
        state = torch.load(tmp_path / f"state-{fsdp}.pt", weights_only=True)
        for n, v in s.state_dict().items():
            assert torch.allclose(state[n], v, atol=1e-5), (fsdp, n)


# ---- QAT, recipe, CLI, validation ----------------------------------------------------------------------


def test_quantization_aware_distillation_beats_rtn():
    t = teacher_model()
    s = copy.deepcopy(t)
    qat.to_fake_quant_(s, bits=2, group_size=16)
    held_out = windows(16, 32, seed=9)
    rtn = kl_to(s, t, held_out)
    distill(s, t, DistillConfig(loss="cakld", tokens=20 * 8 * L_SEQ, batch_size=8, seq_len=L_SEQ, lr=2e-3),
            windows=windows(64), progress=False)
    assert kl_to(s, t, held_out) < 0.8 * rtn
    W = qat.fake_quant_weights(s)["model.layers.0.mlp.up_proj"]  # (128, 64): 4 groups of 16 per row
    assert max(len(set(g.tolist())) for g in W.view(-1, 16)) <= 4


def test_recipe_stage(tmp_path, byte_tok):
    (tmp_path / "c.txt").write_text("\n\n".join(f"document {i} " + "some text here " * 30 for i in range(50)))
    from lmpress.data import DataConfig

    cfg = rc.make_config("distill", loss="tsld", tokens=2 * 4 * L_SEQ, batch_size=4, seq_len=L_SEQ, qat_bits=4,
                         qat_group_size=16, eval_every=2, eval_context=32)
    assert rc.from_dict(rc.to_dict(cfg)) == cfg
    t = teacher_model()
    s = copy.deepcopy(t)
    ctx = rc.RunContext(tokenizer=byte_tok, teacher=t, data=DataConfig(corpus=str(tmp_path / "c.txt"), eval_tokens=200),
                        progress=False)
    res = rc.apply(s, cfg, ctx)
    assert res["steps"] == 2 and res["fake_quant_layers"] == 21 and len(res["evals"]) == 2
    assert type(s.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    with pytest.raises(InputError, match="no option"):
        rc.make_config("distill", bogus=1)
    with pytest.raises(InputError, match="loss must be one of"):
        rc.make_config("distill", loss="mse")
    with pytest.raises(InputError, match="needs the teacher"):
        rc.apply(s, cfg, rc.RunContext(tokenizer=byte_tok))


def test_cli_arguments():
    from lmpress.distill import cli

    assert cli.parse_tokens("2M") == 2_000_000 and cli.parse_tokens("500k") == 500_000 and cli.parse_tokens("1.5e3") == 1500
    with pytest.raises(InputError):
        cli.parse_tokens("lots")
    ap = argparse.ArgumentParser()
    cli.add_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["distill", "--teacher", "T", "--student", "S", "-o", "OUT", "--loss", "cakld", "--on-policy",
                          "0.25", "--tokens", "100k", "--hidden-loss", "cosine", "--qat-bits", "2", "--set", "beta=0.3"])
    cfg = cli.config_from_args(args)
    assert (cfg.loss, cfg.on_policy, cfg.tokens, cfg.hidden_loss, cfg.qat_bits, cfg.beta) == ("cakld", 0.25, 100_000, "cosine", 2, 0.3)


def test_bad_inputs():
    t = teacher_model()
    with pytest.raises(InputError, match="seq_len"):
        distill(truncated(t), t, DistillConfig(tokens=64, batch_size=4, seq_len=8), windows=windows(8), progress=False)
    with pytest.raises(InputError, match="needs a teacher"):
        distill(truncated(t), None, DistillConfig(tokens=64, batch_size=4, seq_len=L_SEQ), windows=windows(8), progress=False)
    with pytest.raises(ValueError, match="grad_accum"):
        DistillConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="top-k teacher cache"):
        DistillConfig(topk=8, topk_cache="x", on_policy=0.5)


def test_recipe_gptq_then_quantization_aware_distillation(tmp_path, byte_tok):
    """gptq -> distill(qat): training starts at the GPTQ model, lowers the KL, ends packed."""
    from lmpress.data import DataConfig

    (tmp_path / "c.txt").write_text("\n\n".join(f"document {i} " + "some text here " * 30 for i in range(50)))
    t = teacher_model()
    s = copy.deepcopy(t)
    ids = torch.tensor([byte_tok("document 51 " + "some text here " * 4)["input_ids"][:L_SEQ * 3]])  # unseen document
    ctx = rc.RunContext(calib=windows(8, seed=3), tokenizer=byte_tok, teacher=t,
                        data=DataConfig(corpus=str(tmp_path / "c.txt")), progress=False)
    rc.apply(s, rc.make_config("gptq", bits=2, group_size=16), ctx)
    kl_ptq = kl_to(s, t, ids)
    cfg = rc.make_config("distill", loss="fkl", tokens=12 * 4 * L_SEQ, batch_size=4, seq_len=L_SEQ, lr=3e-3,
                         qat_bits=2, qat_group_size=16, qat_init_clip=None)
    rc.apply(s, cfg, ctx)
    assert type(s.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    assert kl_to(s, t, ids) < 0.8 * kl_ptq
