"""`dwf plan`: its arithmetic against hand-counted passes and hours on a tiny config, the rate
extrapolation, and the command (a total printed, a JSON written, a bad override refused)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dwf import plan
from dwf.bench import resnet18_macs
from dwf.cli import app
from dwf.config import load_params

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "digits" / "params.yaml"

# round rates at the digits study's sizes: every one measured, none extrapolated
SIZES = {"input_shape": [1, 8, 8], "width": 8, "n_experts": 9, "batch": 64}
EXPERT = {"train": 1000.0, "attack": 2000.0, "forward": 4000.0}
MIXTURE = {"train": 100.0, "attack": 200.0, "forward": 400.0}


def _table(rates: dict[str, dict[str, float]], **sizes) -> dict:
    return {**SIZES, **sizes, "rates": {net: {k: {"per_s": v, "source": f"test {net} {k}"}
                                              for k, v in r.items()} for net, r in rates.items()}}


RATES = {"tables": {"train/fp32": _table({"expert": EXPERT, "mixture": MIXTURE}),
                    "evaluate/fp32": _table({"expert": EXPERT, "mixture": MIXTURE})}}

# a short protocol: FGSM at one eps, PGD-2/3, PGD-4 x 2 restarts, PGD-5; the rest as set below
SHORT = ["evaluate.fgsm_eps=[0.1]", "evaluate.pgd_steps=[2, 3]", "evaluate.ms_steps=4",
         "evaluate.ms_restarts=2", "evaluate.adaptive_steps=5", "evaluate.strong=false",
         "evaluate.audit=false", "evaluate.square_queries=10"]


def _params(tmp_path: Path) -> Path:
    raw = yaml.safe_load(STUDY.read_text())
    raw |= {"runs": [0, 1], "baselines": [], "ablations": [], "evaluate_models": ["dwf", "experts/benign"]}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _rows(tmp_path: Path, robust: float = 0.5) -> dict[str, dict]:
    path = _params(tmp_path)
    p = load_params(path)
    profiles = {"digits": load_params(path, "digits", SHORT).profile("digits")}
    result = plan.plan(p, profiles, RATES, plan.Assumptions(robust=robust))
    assert all(r["measured"] for r in result["rates"])
    return {r["name"]: r for r in result["rows"]} | {"total": result["total"]}  # experts: one kind


def test_plan_matches_hand_counted_hours(tmp_path):
    rows = _rows(tmp_path)
    seconds = {k: r["hours_per_job"] * 3600 for k, r in rows.items() if k != "total"}
    # digits: 1437 training images, batch 64 -> 22 full batches = 1408 per epoch (last dropped)
    assert seconds["expert benign"] == pytest.approx(10 * 1408 / 1000)            # 14.08 s
    # PGD experts: iterations drawn from 1..5 (mean 3), an SGD step after them
    assert seconds["expert pgd"] == pytest.approx(10 * 1408 * (3 / 2000 + 1 / 1000))  # 35.2 s
    assert seconds["expert fgsm"] == pytest.approx(10 * 1408 * (1 / 2000 + 1 / 1000))
    # joint: 4 epochs; FGSM + PGD-k (mean 3) through the mixture, SGD on [clean, FGSM, PGD]
    assert seconds["joint dwf"] == pytest.approx(4 * 1408 * (4 / 200 + 3 / 100))  # 281.6 s
    # protocol per test digit (360): attacks FGSM 1; the PGD runs keep their best iterate, so
    # each restart's first step runs on every digit and its other steps on the robust share r
    # only: PGD-3 1 + 2r, PGD-4 x 2 2 x (1 + 3r), PGD-5 1 + 4r; 5 + 12r in all (17 on every
    # digit). Forwards clean 1 + FGSM check 1 + PGD-2/3 (last score 1, checks 2) + PGD-4 x 2
    # (last scores 2, ranking 2, check 1) + PGD-5 (last score 1, check 1) = 12
    benign = rows["evaluate experts/benign"]["parts"]  # r = 0: the undefended expert keeps none
    assert benign["protocol"] / 2 * 3600 == pytest.approx(360 * (5 / 2000 + 12 / 4000))  # 1.98 s
    # AutoAttack: APGD-CE (101 gradients, 1 clean check) on all 360; the undefended expert keeps
    # nothing, so APGD-T, FAB-T and Square run on no example
    assert benign["autoattack"] / 2 * 3600 == pytest.approx(360 * (101 / 2000 + 1 / 4000))
    dwf = rows["evaluate dwf"]["parts"]
    # the mixture, half robust: 5 + 12 / 2 = 11 attacks, the same 12 forwards plus one gate-usage
    assert dwf["protocol"] / 2 * 3600 == pytest.approx(360 * (11 / 200 + 13 / 400))
    # half of 360 robust: APGD-T 9 x 101 and FAB-T 9 x 100 gradients, FAB's 900 predictions
    # and 10 Square queries on 180 digits
    aa = 360 * (101 / 200 + 1 / 400) + 180 * ((909 + 900) / 200 + (900 + 10) / 400)
    assert dwf["autoattack"] / 2 * 3600 == pytest.approx(aa)
    assert rows["evaluate dwf"]["jobs"] == 2 and rows["total"]["jobs"] == 2 * (9 + 1 + 2)
    once = (seconds["expert benign"] + 4 * seconds["expert fgsm"] + 4 * seconds["expert pgd"]
            + seconds["joint dwf"] + seconds["evaluate dwf"] + seconds["evaluate experts/benign"])
    assert rows["total"]["hours"] == pytest.approx(2 * once / 3600)  # 2 runs


def test_robust_share_prices_the_attacks_after_the_first():
    cfg = load_params(STUDY, "digits", []).profile("digits").evaluate
    none, all_ = (plan.autoattack(cfg, "mixture", 100, r) for r in (0.0, 1.0))
    assert none[("mixture", "attack")] == 100 * 101
    assert all_[("mixture", "forward")] == 100 * (1 + 900 + 5000)
    assert plan.strong(cfg, "mixture", 9, 9, 0, 0.5) == plan.Counts()  # no examples, no passes


def test_only_keep_best_attacks_on_the_model_shrink_to_the_robust_share():
    """A PGD that keeps its best iterate drops an example once an iterate fooled it: its first
    step per restart on every example, the rest on the robust share r; attacks on another
    network (members, transfer sources) and the gate attack take every step on every example."""
    cfg = load_params(STUDY, "digits", ["evaluate.strong_steps=4", "evaluate.strong_restarts=2"]
                      ).profile("digits").evaluate
    n, r = 100, 0.5
    # strong suite: DLR and margin PGD-4 x 2 on the mixture, 2 x 2 x (1 + 3r); the gate attack's
    # 4 x 2 objective iterations; PGD-4 x 2 on 9 members and 9 sources, 8 each, on the expert
    strong = plan.strong(cfg, "mixture", 9, 9, n, r)
    assert strong[("mixture", "attack")] == pytest.approx(n * (4 * (1 + 3 * r) + 8))  # 18, not 24
    assert strong[("expert", "attack")] == n * 18 * 8
    # audit: the eps sweep 1 step at eps 0, 4 at 0.25 and 0.5 eps on every example, 1 + 3r at
    # eps and 2 eps; the iteration sweep 1 x 1: 1, 2 x 1: 1 + r, 4 x 2: 2 (1 + 3r), doubled
    # 8 x 4: 4 (1 + 7r); large eps PGD-20: 1 + 19r; FGSM 1; the binarized model 2 (1 + 3r):
    # 23 + 66r per example, and 2 input gradients on one batch
    audit = plan.audit(cfg, "mixture", n, r)
    assert audit[("mixture", "attack")] == pytest.approx(n * (23 + 66 * r) + 2 * min(cfg.batch_size, n))


def test_registry_rows_run_their_own_network_and_undefended_ones_assume_no_robustness():
    assume = plan.Assumptions(robust=0.5, robust_undefended=0.0)
    assert [plan.network(m) for m in ("dwf", "experts/pgd_0", "trades", "soe", "vgg19")] == [
        "mixture", "expert", "expert", "soe", "vgg19"]
    assert [assume.of(m) for m in ("resnet18", "vgg19", "experts/benign", "trades", "dwf")] == [
        0.0, 0.0, 0.0, 0.5, 0.5]


def test_the_audit_runs_its_own_square_only_where_autoattack_did_not_cover_it(tmp_path):
    """dwf.evaluate reads AutoAttack's Square for the audit's Square check when AutoAttack ran
    on every audited example; the plan prices a second Square only otherwise."""
    cfg = load_params(STUDY, "digits", []).profile("digits").evaluate
    mine, read = (plan.audit(cfg, "mixture", 100, 0.5, square=s) for s in (True, False))
    assert mine[("mixture", "forward")] - read[("mixture", "forward")] == 50 * (cfg.square_queries + 1)
    path = _params(tmp_path)
    p = load_params(path)
    for extra, own in (([], False), (["evaluate.autoattack_n=100"], True)):
        profiles = {"digits": load_params(path, "digits", extra).profile("digits")}
        parts = plan.evaluation_parts(p, "digits", profiles["digits"], "dwf", plan.Assumptions())
        assert parts["audit"] == plan.audit(profiles["digits"].evaluate, "mixture", 360, 0.55, square=own)


def test_macs_hooks_agree_with_the_bench_count():
    m = plan.network_macs(8, (1, 8, 8), 2)
    assert m["expert"] == resnet18_macs(8, 10, (1, 8, 8))
    router = 64 * 1024 + 1024 * 512 + 512 * 128 + 128 * 2
    assert m["mixture"] == 2 * m["expert"] + router


def test_missing_rates_are_extrapolated_and_said_so():
    here = plan.network_macs(8, (1, 8, 8), 9)
    there = {"expert": here["expert"] * 4, "mixture": here["mixture"] * 4}  # 4x the FLOPs there
    pricing = plan.Pricing({"t": _table({"expert": {"attack": 100.0}})}, here, lambda t: there)
    attack = pricing.rate("t", "expert", "attack")
    assert attack.per_s == pytest.approx(400.0) and not attack.measured
    forward = pricing.rate("t", "mixture", "forward")  # from the expert's attack, then x 2
    assert forward.per_s == pytest.approx(2 * 100.0 * there["expert"] / here["mixture"])
    assert "attack rate x 2" in forward.source and not forward.measured
    with pytest.raises(ValueError, match="no 'u' table"):
        pricing.rate("u", "expert", "attack")


def _dwf(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_cli_prints_the_total_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    r = _dwf("plan", "--params", str(STUDY), "--rates", str(ROOT / "docs/bench/cpu-digits.json"),
             "--json", str(out))
    assert r.exit_code == 0, r.output
    assert "| **total** | 270 |" in r.stdout and "measured" in r.stdout
    result = json.loads(out.read_text())
    # experts, joint, ablations, baselines, evaluations (15 systems, 8 more experts, 5 ablations)
    assert result["total"]["jobs"] == 5 * (9 + 1 + 5 + 11 + 15 + 8 + 5)
    # a zoo row is priced from the measured ResNet-18 by the ratio of forward MACs
    zoo = {x["rate"]: x for x in result["rates"]}["train/fp32: resnet34 train"]
    assert not zoo["measured"] and zoo["source"].startswith("expert train")
    assert result["total"]["hours"] == pytest.approx(
        sum(s["hours"] for s in result["stages"].values()))


def test_cli_bad_override_is_one_line_exit_2(tmp_path):
    r = _dwf("plan", "--params", str(STUDY), "--rates", str(ROOT / "docs/bench/cpu-digits.json"),
             "--set", "expert.epochs=zero")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "expert.epochs" in r.stderr


def test_cli_refuses_to_write_its_json_over_an_input(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(STUDY.read_bytes())
    r = _dwf("plan", "--params", str(params), "--json", str(params))
    assert r.exit_code == 2 and params.read_bytes() == STUDY.read_bytes()


# forward MACs counted by hand, layer by layer, for the digits study's networks (1x8x8, 10 classes):
# width-8 ResNet-18: stem 64*8*9 = 4608; stage 1 four 8->8 convs on 8x8, 4 * 64*8*72 = 147456;
# stages 2-4 each 131072 (first conv 18432, second 36864, 1x1 shortcut 2048, second block 73728);
# linear 640. The mixture: nine of them plus the router 64-1024-512-128-9 (656512).
RESNET18_W8 = 4608 + 147456 + 3 * 131072 + 640
MIXTURE_W8 = 9 * RESNET18_W8 + 64 * 1024 + 1024 * 512 + 512 * 128 + 128 * 9


def test_training_cost_matches_a_hand_count():
    params = load_params(STUDY, "digits")
    prof = params.profile("digits")
    steps = 22 * 64  # 1437 training digits in batches of 64: the last partial batch dropped
    # PGD-AT, 10 epochs: an SGD step (3 forwards) + PGD-3 (2 forwards a step) on half the batch
    pgd_at = 10 * steps * (3 + 2 * 3 * 0.5) * RESNET18_W8
    # DWF: experts 10 epochs (benign 3; FGSM 3 + 2; PGD-k, mean k 3: 3 + 6), then 4 joint
    # epochs through the mixture: FGSM + PGD-k (2 x (1 + 3)) and SGD on three views (3 x 3)
    experts = 10 * steps * (3 + 4 * (3 + 2) + 4 * (3 + 6)) * RESNET18_W8
    joint = 4 * steps * (2 * (1 + 3) + 3 * 3) * MIXTURE_W8
    # the ablations: frozen experts, the SGD step a forward of each view (the gate's backward
    # not counted); no pretraining, 7 joint epochs alone; a fixed PGD-3, as the mean of 1..5;
    # four PGD experts: their pretraining, and a mixture of four (router 64-1024-512-128-4)
    frozen = 4 * steps * (2 * (1 + 3) + 3 * 1) * MIXTURE_W8
    four = 4 * RESNET18_W8 + 64 * 1024 + 1024 * 512 + 512 * 128 + 128 * 4
    pgd_only = 10 * steps * 4 * (3 + 6) * RESNET18_W8 + 4 * steps * (2 * (1 + 3) + 3 * 3) * four
    for model, macs in (("resnet18_pgd_at", pgd_at), ("dwf", experts + joint),
                        ("experts/pgd_0", 10 * steps * 9 * RESNET18_W8),
                        ("dwf_uniform", experts + joint),  # DWF's weights: its training
                        ("dwf_frozen_experts", experts + frozen),
                        ("dwf_no_pretraining", 7 / 4 * joint), ("dwf_fixed_strengths", experts + joint),
                        ("dwf_pgd_experts", pgd_only)):
        assert plan.training_cost(params, "digits", prof, model)["train_tmacs"] == round(macs / 1e12, 6), model


def test_the_studys_matched_rows_are_matched_and_never_above_dwf():
    params = load_params(STUDY, "digits")
    prof = params.profile("digits")
    dwf = plan.training_cost(params, "digits", prof, "dwf")["train_tmacs"]
    for row in ("pgd_at_matched_cost", "trades_matched_cost", "pgd_at_matched_params",
                "trades_matched_params", "dwf_no_pretraining"):
        cost = plan.training_cost(params, "digits", prof, row)["train_tmacs"]
        assert 0.9 * dwf <= cost <= dwf, row
    wide = plan.network_macs(8, (1, 8, 8), 9, baselines={"pgd_at_matched_params": prof.baselines.get(
        "pgd_at_matched_params")})
    assert wide["pgd_at_matched_params"] > 10 * wide["expert"]  # priced as its own, wider network


@pytest.fixture(scope="module")
def paper_plan(tmp_path_factory):
    """`dwf plan` of the paper's params.yaml with no --device or --rates (about 15 s: it counts
    every network's MACs at width 64), once for the tests that read it."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    r = _dwf("plan", "--params", str(ROOT / "params.yaml"), "--json", str(out))
    assert r.exit_code == 0, r.output
    return r.stdout, json.loads(out.read_text())


def test_plan_without_device_or_rates_prices_the_configuration_on_its_own_device(paper_plan):
    """The paper's datasets at the GPU's rates, the digits study at the CPU's, whatever this
    machine has; the first line says which."""
    digits = _dwf("plan", "--params", str(STUDY))
    assert digits.exit_code == 0, digits.output
    assert "priced at NVIDIA H200 rates" in paper_plan[0].splitlines()[0]
    assert paper_plan[1]["device"] == "NVIDIA H200"
    assert "priced at cpu rates" in digits.stdout.splitlines()[0]


def test_plan_prints_hours_not_scientific_notation(paper_plan):
    table = paper_plan[0].split("\nrates")[0]
    assert not re.search(r"\d[eE][+-]?\d", table), table
    assert "| **total** | 420 |" in table and "1,7" in table  # 1,7xx device-hours
    assert plan._h(1346.2) == "1,346" and plan._h(18.71) == "18.7" and plan._h(0.005) == "18 s"


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu", "nonsense"])
def test_plan_on_a_device_this_machine_lacks_is_one_line_exit_2(device):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = _dwf("plan", "--params", str(STUDY), "--device", device)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"--device {device}" in r.stderr


def _runtimes(profile: Path) -> dict[str, float]:
    """Minutes each pipeline rule may run under a Snakemake profile (set-resources over
    default-resources)."""
    cfg = yaml.safe_load(profile.read_text())
    default = cfg["default-resources"]["runtime"]
    rules = ("expert", "joint", "ablation", "baseline", "evaluate")
    return {r: (cfg.get("set-resources", {}).get(r) or {}).get("runtime", default) for r in rules}


def _slurm_profile_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_profile", ROOT / "scripts" / "slurm-profile.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def paper_rule_hours():
    """The paper's longest job per rule with every ablation opted in, as the script prices them."""
    return _slurm_profile_script().planned()


@pytest.mark.parametrize("profile", ["slurm", "slurm-local"])
def test_slurm_profile_lets_every_rule_run_as_long_as_the_plan_says(profile, paper_rule_hours):
    """Each rule's time limit is at least the plan's longest job of that rule (issue 24):
    profiles/slurm's for the paper at H200 rates, written by scripts/slurm-profile.py;
    profiles/slurm-local's for the digits study at this CPU's."""
    if profile == "slurm":
        longest = paper_rule_hours
    else:
        p = load_params(STUDY)
        _, rates = plan.load_rates(None, "cpu")
        longest = plan.rule_hours(plan.plan(p, {"digits": load_params(STUDY, "digits", []).profile("digits")}, rates))
    allowed = _runtimes(ROOT / "profiles" / profile / "config.yaml")
    assert set(longest) == set(allowed)
    short = {r: (allowed[r], round(60 * h)) for r, h in longest.items() if allowed[r] < 60 * h}
    assert not short, f"{profile}: runtime (min) below the plan's longest job (min): {short}"


def test_slurm_profile_script_writes_the_plans_runtimes_and_nothing_else(paper_rule_hours):
    script = _slurm_profile_script()
    text = script.PROFILE.read_text()
    # the committed profile is what the script writes from today's plan
    assert script.rewrite(text, script.runtimes(paper_rule_hours)) == text
    lines, changed = text.splitlines(), script.rewrite(text, {"joint": 7}).splitlines()
    diff = [i for i, (a, b) in enumerate(zip(lines, changed)) if a != b]
    assert len(diff) == 1 and lines[diff[0] - 1] == "  joint:" and changed[diff[0]] == "    runtime: 7"
    assert script.runtimes({"expert": 0.1, "joint": 2.0}) == {"expert": 60, "joint": 180}
    with pytest.raises(SystemExit):
        script.rewrite(text, {"forensics": 60})
