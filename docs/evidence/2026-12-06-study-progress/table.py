"""DWF against its matched rows and the hard-routed mixtures, over every run this code has
evaluated so far: the study's metrics files (studies/digits, those with `train_tmacs`, i.e. made
by this code) and, for runs the study's rebuild has not reached yet, the evaluations of the
stopped rebuild of the previous session (docs/evidence/2026-12-06-partial-study), made by the
same training and evaluation code (every stage dep of theirs is byte-identical) with the same
params. Run from the repository root: python docs/evidence/2026-12-06-study-progress/table.py
"""
import json
from pathlib import Path

from dwf.config.defenses import label
from dwf.verdict import paired

STUDY = Path("studies/digits/metrics/runs/digits")
EARLIER = Path("docs/evidence/2026-12-06-partial-study")
ROWS = ["pgd_at_matched_cost", "trades_matched_cost", "pgd_at_matched_params", "soe", "advmoe",
        "resnet18_pgd_at", "trades"]


def metrics(run: int, model: str) -> tuple[dict, str] | None:
    for source, root in (("study", STUDY / f"run{run}"), ("earlier", EARLIER / f"run{run}")):
        path = root / "eval" / f"{model}.json"
        if path.is_file():
            m = json.loads(path.read_text())
            if "train_tmacs" in m:  # made by this code (the committed study's older files lack it)
                return m, source
    return None


dwf = {r: metrics(r, "dwf") for r in range(5)}
print("| system | runs (* the earlier session's) | training (x DWF's) | parameters (M) "
      "| its worst case | DWF's, same runs | DWF - it, paired |")
print("|---|---|---|---|---|---|---|")
for model in ROWS:
    got = {r: metrics(r, model) for r in range(5)}
    runs = [r for r in range(5) if got[r] and dwf[r]]
    if not runs:
        print(f"| {label(model)} | - | | | | | |")
        continue
    t = paired([dwf[r][0]["worst_case"] for r in runs], [got[r][0]["worst_case"] for r in runs])
    interval = f" ± {t['ci95']:.2f} (p = {t['p']:.2g})" if t["n"] > 1 else ""
    first = got[runs[0]][0]
    print(f"| {label(model)} | {', '.join(str(r) + ('*' if got[r][1] == 'earlier' else '') for r in runs)} "
          f"| {first['train_tmacs'] / dwf[runs[0]][0]['train_tmacs']:.2f} | {first['params_m']:.2f} "
          f"| {', '.join('%.2f' % got[r][0]['worst_case'] for r in runs)} "
          f"| {', '.join('%.2f' % dwf[r][0]['worst_case'] + ('*' if dwf[r][1] == 'earlier' else '') for r in runs)} "
          f"| {t['diff']:+.2f}{interval} |")
