"""The table of docs/evidence/2026-12-06-partial-study/README.md, from the metrics files there."""
import json
from pathlib import Path
from dwf.verdict import paired
from dwf.config.defenses import label
D = Path("docs/evidence/2026-12-06-partial-study")
rows = ["pgd_at_matched_cost", "trades_matched_cost", "pgd_at_matched_params", "soe", "advmoe"]
dwf = {r: json.loads((D / f"run{r}/eval/dwf.json").read_text()) for r in range(5)}
print("| system | runs | training (TMAC) | x DWF's | parameters (M) | its worst case | DWF's, same runs | DWF - it (paired) |")
print("|---|---|---|---|---|---|---|---|")
for m in rows:
    got = {r: json.loads((D / f"run{r}/eval/{m}.json").read_text()) for r in range(5) if (D / f"run{r}/eval/{m}.json").is_file()}
    rs = sorted(got)
    t = paired([dwf[r]["worst_case"] for r in rs], [got[r]["worst_case"] for r in rs])
    ci = " ± %.2f (p = %.3g)" % (t["ci95"], t["p"]) if t["n"] > 1 else ""
    g = got[rs[0]]
    its = ", ".join("%.2f" % got[r]["worst_case"] for r in rs)
    ours = ", ".join("%.2f" % dwf[r]["worst_case"] for r in rs)
    print(f"| {label(m)} | {', '.join(map(str, rs))} | {g['train_tmacs']:.3f} | {g['train_tmacs'] / dwf[0]['train_tmacs']:.2f} | "
          f"{g['params_m']:.2f} | {its} | {ours} | {t['diff']:+.2f}{ci} |")
