"""Ablation of the GGUF solve on real layers: H-weighted output error of each way to choose the weights.

    python bench/gguf_layer_ablation.py Q4_0 IQ4_NL

Default model (SmolLM2-135M-Instruct), 8 x 512 calibration tokens of the default corpus; for three
layers (block 5 q_proj, block 5 down_proj, block 20 gate_proj) the Hessian H = X^T X / n of their
inputs in the float model, then the relative error tr(D H D^T) / tr(W H W^T), D = Wq - W, of:
``rtn`` (ggml.quantize: llama.cpp's round-to-nearest without an importance matrix), ``fit1`` (the scale
search, uniform weights), ``fitH`` (the scale search weighted by diag(H), as llama.cpp's imatrix
quantizers weight theirs), ``gptq_ao_dX`` (GPTQ, act-order, static parameters from the diag(H) search,
dampening X), ``..._uniform`` (the same with an unweighted search), ``gptq_nat`` (natural order, each
block's parameters fitted when the sweep reaches it). Prints one line per layer and type.
"""

import sys
from pathlib import Path

import torch

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
LAYERS = ["model.layers.5.self_attn.q_proj", "model.layers.5.mlp.down_proj", "model.layers.20.mlp.gate_proj"]


def hessians(model, calib) -> dict:
    H = {}

    def hook(n):
        def f(m, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            H[n] = H.get(n, 0) + x.T @ x
        return f

    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in LAYERS]
    with torch.no_grad():
        for i in range(calib.shape[0]):
            model(calib[i : i + 1])
    for h in hs:
        h.remove()
    return {n: (h / calib.numel()).float() for n, h in H.items()}


def main() -> None:
    import lmpress
    from lmpress.data import DataConfig, prepare
    from lmpress.quant import ggml
    from lmpress.quant.gptq import gptq_solve_ggml, inverse_hessian

    torch.set_num_threads(1)
    model, tok = lmpress.load_model()
    calib, _ = prepare(tok, DataConfig(calib_samples=8, calib_len=512), need_eval=False)
    for n, H in hessians(model, calib).items():
        W = model.get_submodule(n).weight.detach().float()
        d = torch.diag(H)

        def herr(Wq):
            D = Wq - W
            return (((D @ H) * D).sum() / ((W @ H) * W).sum()).item()

        for t in sys.argv[1:] or ["Q4_0", "IQ4_NL"]:
            r = {"rtn": herr(ggml.dequantize(ggml.quantize(W, t))), "fit1": herr(ggml.dequantize(ggml.fit(W, t))),
                 "fitH": herr(ggml.dequantize(ggml.fit(W, t, d)))}
            for damp in (0.01, 0.1):
                hinv = inverse_hessian(H, damp, True)
                r[f"gptq_ao_d{damp}"] = herr(ggml.dequantize(gptq_solve_ggml(W, hinv, t, d)))
                r[f"gptq_ao_d{damp}_uniform"] = herr(ggml.dequantize(gptq_solve_ggml(W, hinv, t, torch.ones_like(d))))
            r["gptq_nat"] = herr(ggml.dequantize(gptq_solve_ggml(W, inverse_hessian(H, 0.01, False), t, d)))
            print(n.split("layers.")[1], t, " ".join(f"{k} {v:.5f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
