"""Write the SLURM profile's per-rule runtimes from `dwf plan` (one source for both).

Each rule's `runtime` in profiles/slurm/config.yaml becomes the plan's longest job of that rule
(params.yaml at the rates of the device the profile names), times MARGIN, rounded up to whole
hours. Only the numbers on the `runtime:` lines under `set-resources` change; comments,
partitions and memory stay as written. tests/test_plan.py fails when a runtime falls below the
plan, so rerun this after a change to params.yaml or to the rates in docs/bench/:

    python scripts/slurm-profile.py            # rewrite profiles/slurm/config.yaml
    python scripts/slurm-profile.py --check    # exit 1 if it would change
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

from dwf.config import ABLATION_NAMES, load_params
from dwf.plan import Assumptions, load_rates, plan, rule_hours

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
PARAMS = ROOT / "params.yaml"
DEVICE = "NVIDIA H200"  # the GPU whose measured rates price the paper's jobs (docs/bench/h200.json)
MARGIN = 1.5            # the plan extrapolates; a job killed at its limit loses up to an epoch


def runtimes(longest: dict[str, float]) -> dict[str, int]:
    """Minutes each rule's jobs may run: its longest job's hours x MARGIN, in whole hours."""
    return {rule: 60 * math.ceil(hours * MARGIN) for rule, hours in longest.items()}


def planned(params: Path = PARAMS, device: str = DEVICE) -> dict[str, float]:
    """The plan's longest job of each rule, in hours (dwf.plan.rule_hours), with every ablation
    opted in (params `ablations`: the rule must allow them when a user lists them)."""
    p = dataclasses.replace(load_params(params), ablations=ABLATION_NAMES)
    profiles = {d: load_params(params, d, []).profile(d) for d in p.datasets}
    _, rates = load_rates(None, device)
    return rule_hours(plan(p, profiles, rates, Assumptions()))


def rewrite(text: str, minutes: dict[str, int]) -> str:
    """`text` with the runtime of each rule in `minutes` replaced (the line `runtime: N` right
    under `  <rule>:` in set-resources); a rule the profile does not list is an error."""
    for rule, m in minutes.items():
        pattern = re.compile(rf"(^  {re.escape(rule)}:\n    runtime: )\d+", re.M)
        text, n = pattern.subn(rf"\g<1>{m}", text)
        if n != 1:
            raise SystemExit(f"{PROFILE}: no `runtime:` line right under set-resources' {rule}:")
    return text


def main(argv: list[str]) -> int:
    old, minutes = PROFILE.read_text(), runtimes(planned())
    new = rewrite(old, minutes)
    if "--check" in argv:
        if new != old:
            print(f"{PROFILE}: runtimes differ from the plan's; run python scripts/slurm-profile.py")
            return 1
        return 0
    PROFILE.write_text(new)
    print(f"{PROFILE}: " + ", ".join(f"{r} {m} min" for r, m in minutes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
