"""Experiment: lmpress.plan at TARGET with quantizer=gptq (GPTQ error-ratio correction) or rtn, on the
bench/plan.py settings (default model, 32 x 512 calibration, holdout 4, recipes 8; its sensitivity cache).

    python bench/plan_gptq_ratio_experiment.py bits=4.5 gptq
"""
import sys, time, torch, json
torch.set_num_threads(2)
import lmpress
from lmpress.data import DataConfig
from lmpress.io import load_model
from lmpress.planner.config import PlanConfig
model, tok = load_model()
data = DataConfig(calib_samples=32, calib_len=512, eval_tokens=4096)
cfg = PlanConfig(holdout_rows=4, holdout_len=512, fisher_rows=2, kl_rows=1, kl_len=128, recipes=8, quantizer=sys.argv[2])
t=time.time()
res = lmpress.plan(model, tokenizer=tok, target=sys.argv[1], data=data, config=cfg, progress=False)
last = res["rounds"][-1]
from collections import Counter
print(sys.argv, "cached", res["seconds"]["cached"], "kl", last["kl"], "ppl", last["perplexity"], "bits", last["bits"], "pred", last["predicted_kl"], time.time()-t)
print(Counter(last["choice"].values()))
print(res["seconds"])
json.dump(res, open(f"plan-{sys.argv[1]}-{sys.argv[2]}.json", "w"), default=str)
