"""Run llm-compressor's ``oneshot`` on CPU and save the result dense, for lmpress to evaluate.

Run with the peer venv's python (see ``setup_llmcompressor.sh``), never lmpress's::

    /work/peers/llmc/bin/python bench/peers/llmc_oneshot.py --model DIR --calib calib.npy \
        --out OUT --scheme sparsegpt-2:4

``--calib``: int64 numpy array (n, L) of token ids, the same rows lmpress calibrates on.
Schemes (one string, parsed):

* ``wanda-0.5``, ``wanda-2:4``, ``sparsegpt-0.5``, ``sparsegpt-2:4`` (sparsity or N:M pattern);
* ``gptq-w4g64``, ``gptq-w3g64``, ``gptq-w8``, ``rtn-w4g32``, ``awq-w4g64-asym``, ...:
  ``{gptq|rtn|awq}-w{bits}[g{group}][-sym|-asym]``; no ``g``: one scale per output channel;
  default symmetric (llm-compressor's W4A16 default).

With ``--compressed`` the output is llm-compressor's own compressed-tensors folder, as its users
get it. Otherwise the output folder holds fp32 safetensors with the weights as llm-compressor left them (quantized
weights dequantized onto their grid, pruned weights zero), the config without any
``quantization_config`` and the tokenizer: ``lmpress.load_model(OUT)`` reads it in lmpress's venv.
The last line printed is JSON with ``oneshot_seconds`` (wall time of the ``oneshot`` call alone).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np
import torch


def parse_scheme(s: str) -> dict:
    m = re.fullmatch(r"(wanda|sparsegpt)-(?:(\d+):(\d+)|(0?\.\d+))", s)
    if m:
        if m.group(2):
            return {"method": m.group(1), "sparsity": 1 - int(m.group(2)) / int(m.group(3)), "mask_structure": f"{m.group(2)}:{m.group(3)}"}
        return {"method": m.group(1), "sparsity": float(m.group(4)), "mask_structure": "0:0"}
    m = re.fullmatch(r"(gptq|rtn|awq)-w(\d+)(?:g(\d+))?(?:-(sym|asym))?", s)
    if m:
        return {"method": m.group(1), "bits": int(m.group(2)), "group_size": int(m.group(3)) if m.group(3) else None,
                "symmetric": m.group(4) != "asym"}
    raise SystemExit(f"unknown scheme {s!r}: use wanda-0.5, sparsegpt-2:4, gptq-w4g64, rtn-w8, awq-w4g128-asym, ...")


def quant_scheme(p: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    g = p["group_size"]
    args = QuantizationArgs(num_bits=p["bits"], type="int", symmetric=p["symmetric"],
                            strategy="group" if g else "channel", group_size=g)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}


def modifier(p: dict):
    ignore = ["re:.*lm_head"]
    if p["method"] == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=p["sparsity"], mask_structure=p["mask_structure"], ignore=ignore)
    if p["method"] == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=p["sparsity"], mask_structure=p["mask_structure"], ignore=ignore)
    if p["method"] == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(config_groups=quant_scheme(p), ignore=ignore)
    if p["method"] == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(config_groups=quant_scheme(p), ignore=ignore)
    from llmcompressor.modifiers.awq import AWQModifier

    torch.Tensor.pin_memory = lambda self, *a, **k: self  # CPU only: AWQ pins unconditionally (PEERS.md)
    return AWQModifier(config_groups=quant_scheme(p), ignore=ignore)


def dense_state(model) -> dict[str, torch.Tensor]:
    """Weights as the model computes with them: fake-quantized where a weight scale is attached."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    with torch.no_grad():
        for mod in model.modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and hasattr(mod, "weight_scale"):
                zp = getattr(mod, "weight_zero_point", None)
                if getattr(mod, "weight_g_idx", None) is not None and (mod.weight_g_idx != mod.weight_g_idx.sort().values).any():
                    raise SystemExit("group act-order (g_idx) weights are not supported here; use actorder static or none")
                mod.weight.data = fake_quantize(mod.weight.data, mod.weight_scale, zp, scheme.weights).float()
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


def save_dense(model_dir: str, state: dict, out: str) -> None:
    """A fresh copy of the original model with the processed weights, saved by plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    keys = set(fresh.state_dict())
    missing, _ = fresh.load_state_dict({k: v for k, v in state.items() if k in keys}, strict=False)
    if [k for k in missing if "lm_head" not in k]:
        raise SystemExit(f"processed model lacks tensors {missing[:3]}")
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compressed", action="store_true",
                    help="save llm-compressor's own compressed-tensors folder (save_compressed=True) instead of dense")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = parse_scheme(a.scheme)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    ids = np.load(a.calib).astype(np.int64)  # (n, L)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    t0 = time.perf_counter()
    model = oneshot(model=model, dataset=ds, recipe=[modifier(p)], num_calibration_samples=len(ids),
                    max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=a.batch_size)
    seconds = time.perf_counter() - t0
    if a.compressed:
        from transformers import AutoTokenizer

        model.save_pretrained(a.out, save_compressed=True)
        AutoTokenizer.from_pretrained(a.model).save_pretrained(a.out)
    else:
        save_dense(a.model, dense_state(model), a.out)
    print(json.dumps({"scheme": a.scheme, "oneshot_seconds": seconds, "calib_shape": list(ids.shape), **p}))


if __name__ == "__main__":
    main()
