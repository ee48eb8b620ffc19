# The study's relaxed-router attacks (dwf.evaluate.strong_suite's, same seeds) on the committed
# SoE and ADVMoE checkpoints, merged with the committed per-example worst case.
# From studies/digits: python <this file> soe 0,1,2,4
import json, sys, torch
from dwf import evaluate as ev
from dwf.checkpoint import load_model
from dwf.config import load_params
from dwf.data import load_split, to_unit
from dwf.models import frozen
from dwf.runtime import derive_seed
torch.set_num_threads(1)
root = "."  # run from studies/digits
p = load_params(f"{root}/params.yaml", "digits", [])
cfg = p.profile("digits").evaluate
x8, y = load_split("digits", f"{root}/data", "test")
name = sys.argv[1]
res = []
for r in map(int, sys.argv[2].split(",")):
    m = load_model(f"{root}/models/digits/run{r}/{name}.pt").eval()
    det = json.load(open(f"{root}/metrics/runs/digits/run{r}/eval/{name}.details.json"))
    prev = torch.tensor([c == "1" for c in det["per_example"]["worst_case_correct"]])
    suite = {k: e for k, e in ev.strong_suite(cfg, m, {}).items() if "relaxed" in k}
    seed = derive_seed(p.seed, r, "digits", "evaluate")
    worst, alone = prev.clone(), {}
    with frozen(m):
        for k, e in suite.items():
            ok = []
            for b in range(0, 360, cfg.batch_size):
                xb, yb = to_unit(x8[b:b + cfg.batch_size]), y[b:b + cfg.batch_size]
                xa = e.run(m, xb, yb, derive_seed(seed, k, b // cfg.batch_size))
                with torch.no_grad():
                    ok.append(m(xa).argmax(1) == yb)
            ok = torch.cat(ok); worst &= ok; alone[k] = round(100 * ok.float().mean().item(), 2)
    res.append((round(100 * prev.float().mean().item(), 2), round(100 * worst.float().mean().item(), 2)))
    print(name, f"run {r}: committed {res[-1][0]:.2f} -> with relaxed {res[-1][1]:.2f}", alone, flush=True)
old = [a for a, _ in res]; new = [b for _, b in res]
import statistics as st
print(name, f"mean {st.mean(old):.2f} ± {st.stdev(old):.2f} -> {st.mean(new):.2f} ± {st.stdev(new):.2f}", flush=True)
