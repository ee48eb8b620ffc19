"""Protocol forensics (dwf.forensics): each evaluation mistake does what its name says, and only
that; the correct protocol is attacks.pgd; the judgement and the page section are computed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from dwf import attacks, checkpoint, forensics, models
from dwf.cli import app
from dwf.config.defenses import label
from dwf.runtime import derive_seed

EPS, ALPHA = 0.1, 0.03
STEPS = (1, 3)


def _net(channels: int = 1, mean=None, std=None, seed: int = 0) -> models.ResNet18:
    """An untrained width-2 ResNet-18 on (channels, 8, 8) with BatchNorm statistics off their
    defaults (so train and eval mode differ), in eval mode."""
    torch.manual_seed(seed)
    net = models.ResNet18(num_classes=10, width=2, mean=mean or (0.3,) * channels,
                          std=std or (0.4,) * channels, in_channels=channels)
    with torch.no_grad():
        net.train()(torch.rand(16, channels, 8, 8))
    return net.eval()


def _mixture(seed: int = 0) -> models.SoftMoE:
    torch.manual_seed(seed)
    moe = models.SoftMoE([_net(seed=seed + i) for i in range(2)], (0.3,), (0.4,),
                         router_hidden=(8,), input_shape=(1, 8, 8))
    return moe.eval()


def _batch(n: int = 12, channels: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_correct_is_attacks_pgd():
    model, (x, y) = _net(), _batch()
    out = forensics.correct(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, seed=5)
    for k in STEPS:
        assert torch.equal(out[k], attacks.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=k, seed=5))


def test_box_pgd_is_the_correct_one_with_the_pixel_box():
    """The normalized-unit variants share the correct PGD's start and steps: with a scalar
    budget and the box [0, 1] their loop is attacks.pgd_iterates, so each differs only in its
    own mistake."""
    model, (x, y) = _net(), _batch()
    mine = forensics._pgd_in_box(model, x, y, eps=EPS, alpha=ALPHA, lo=0.0, hi=1.0, steps=STEPS, seed=3)
    ref = attacks.pgd_iterates(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, seed=3)
    for k in STEPS:
        assert torch.allclose(mine[k], ref[k], atol=1e-7)


def test_normalized_units_budget_is_eps_times_std_per_channel():
    std = (0.2, 0.3, 0.5)
    model, (x, y) = _net(3, mean=(0.5,) * 3, std=std), _batch(channels=3)
    x_adv = forensics.normalized_units(model, x, y, eps=EPS, alpha=ALPHA, steps=(4,), seed=0)[4]
    delta = (x_adv - x).abs().amax(dim=(0, 2, 3))  # per channel
    for c, s in enumerate(std):
        assert delta[c] <= EPS * s + 1e-6
        assert delta[c] > 0.9 * EPS * s  # the budget is used: smaller than eps, not zero
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_clamp_normalized_clamps_the_normalized_tensor_not_the_pixels():
    """mean + std > 1: the normalized box [0, 1] is [0.5, 1.1] in pixels, so images leave both
    the pixel range and the eps-ball, and the sweep says so; inside the box the budget is eps."""
    mean, std = (0.5,), (0.6,)
    model, (x, y) = _net(1, mean=mean, std=std), _batch()
    x_adv = forensics.clamp_normalized(model, x, y, eps=EPS, alpha=ALPHA, steps=(2,), seed=0)[2]
    z = (x_adv - mean[0]) / std[0]
    assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
    assert (x_adv > 1).any()  # pixels beyond [0, 1]
    assert ((x_adv - x).abs().flatten(1).amax(1) > EPS).any()  # and beyond the ball
    inside = (x >= mean[0]) & (x <= mean[0] + std[0])
    assert (x_adv - x).abs()[inside].max() <= EPS + 1e-6  # pixel units, not normalized ones
    run = forensics.sweep(model, x, y, "clamp_normalized", eps=EPS, alpha=ALPHA, steps=(2,))
    assert run["outside_unit"][2] > 0 and run["outside_ball"][2] > 0
    assert run["max_linf"][2] > EPS


def test_normalized_input_is_both_mistakes_at_once():
    mean, std = (0.5,), (0.6,)
    model, (x, y) = _net(1, mean=mean, std=std), _batch()
    x_adv = forensics.normalized_input(model, x, y, eps=EPS, alpha=ALPHA, steps=(4,), seed=0)[4]
    z = (x_adv - mean[0]) / std[0]
    assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
    inside = (x >= mean[0]) & (x <= mean[0] + std[0])
    moved = (x_adv - x).abs()[inside]
    assert moved.max() <= EPS * std[0] + 1e-6 and moved.max() > 0.9 * EPS * std[0]


def test_bn_train_attacks_in_train_mode_and_leaves_the_model_as_it_was():
    model, (x, y) = _net(), _batch()
    before = copy.deepcopy(model.state_dict())
    out = forensics.bn_train(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, seed=2)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    in_train = attacks.pgd_iterates(copy.deepcopy(model).train(), x, y, eps=EPS, alpha=ALPHA,
                                    steps=STEPS, seed=2)
    in_eval = forensics.correct(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, seed=2)
    assert torch.equal(out[3], in_train[3])
    assert not torch.equal(out[3], in_eval[3])


def test_no_random_start_starts_at_x_and_needs_no_seed():
    model, (x, y) = _net(), _batch()
    a = forensics.no_random_start(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS)
    b = forensics.no_random_start(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, seed=9)
    assert all(torch.equal(a[k], b[k]) for k in STEPS)
    with torch.enable_grad():
        x_req = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(attacks.cross_entropy(model(x_req), y).sum(), x_req)
    assert torch.equal(a[1], attacks.project(x + ALPHA * g.sign(), x, EPS))  # step 1 from x


def test_softmax_mixture_loss_is_the_log_of_mixed_probabilities():
    moe, (x, y) = _mixture(), _batch()
    with torch.no_grad():
        w, f = moe.gate_weights(x), moe.expert_logits(x)
        by_hand = -torch.log((w[:, :, None] * f.softmax(-1)).sum(1)).gather(1, y[:, None]).squeeze(1)
        loss = attacks.cross_entropy(forensics.ProbabilityMixture(moe)(x), y)
    assert torch.allclose(loss, by_hand, atol=1e-5)
    assert not torch.allclose(loss, attacks.cross_entropy(moe(x), y), atol=1e-3)  # not the logits'
    with pytest.raises(ValueError, match="mixture"):
        forensics.softmax_mixture(_net(), x, y, eps=EPS, alpha=ALPHA, steps=STEPS)


def test_sweep_judges_the_eval_model_on_pixel_clamped_images():
    model, (x, y) = _net(), _batch()
    run = forensics.sweep(model, x, y, "correct", eps=EPS, alpha=ALPHA, steps=STEPS, seed=4)
    x_adv = forensics.correct(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS,
                              seed=derive_seed(4, "correct", 0))
    for k in STEPS:
        with torch.no_grad():
            acc = 100 * (model(x_adv[k]).argmax(1) == y).float().mean().item()
        assert run["accuracy"][k] == pytest.approx(acc, abs=1e-3)
        assert run["outside_ball"][k] == 0 and run["max_linf"][k] <= EPS + 1e-6
    assert run["label"] == "correct"
    assert forensics.NOT_VALID in forensics.sweep(model, x, y, "bn_train", eps=EPS, alpha=ALPHA,
                                                  steps=STEPS)["label"]
    with pytest.raises(ValueError, match="eval mode"):
        forensics.sweep(model.train(), x, y, "correct", eps=EPS, alpha=ALPHA, steps=STEPS)


@pytest.mark.parametrize("levels, expected", [
    ({10: 46.20, 100: 44.86}, True),              # the paper's ResNet-50 (PGD-10, PGD-100 MS)
    ({"10": 20.0 + 5.0, "100": 20.0}, True),      # at both thresholds; JSON keys
    ({10: 8.6, 50: 1.0, 100: 0.0}, False),        # a correct attack on an undefended net
    ({10: 60.0, 100: 40.0}, False),               # high, but falls with iterations
    ({10: 12.0, 100: 11.5}, False),               # flat, but no floor
])
def test_matches_paper(levels, expected):
    assert forensics.matches_paper(levels) is expected


def _results(undefended_rows: dict[str, list[float]]) -> dict:
    """A hand-made compare() result on steps 10 and 100; the mixture rows all fall."""
    def run(levels, variant):
        acc = dict(zip((10, 100), levels))
        return {"label": forensics.label(variant), "accuracy": acc, "max_linf": {10: 0.2, 100: 0.2},
                "outside_ball": {10: 0.0, 100: 0.0}, "outside_unit": {10: 0.0, 100: 0.0},
                "matches_paper": forensics.matches_paper(acc)}
    plain = {v: run(undefended_rows.get(v, [5.0, 0.0]), v) for v in forensics.VARIANTS}
    plain["softmax_mixture"] = None
    mix = {v: run([60.0, 40.0], v) for v in forensics.VARIANTS}
    return {"eps": 0.2, "alpha": 0.05, "steps": [10, 100], "seed": 0, "n_examples": 360,
            "floor": forensics.FLOOR, "flatness": forensics.FLATNESS, "undefended": "experts/benign",
            "models": {"experts/benign": {"clean": 98.0, "mixture": False, "variants": plain},
                       "dwf": {"clean": 97.0, "mixture": True, "variants": mix}}}


def test_section_names_the_matching_variant_and_marks_every_mistake():
    results = json.loads(json.dumps(_results({"normalized_units": [45.0, 43.0]})))  # as read back
    text = forensics.section(results)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "PGD-" not in ln]
    assert len(rows) == 2 * len(forensics.VARIANTS)
    assert all(forensics.NOT_VALID in r for r in rows if not r.startswith("| correct |"))
    assert "| softmax_mixture (not a valid evaluation) | experts/benign | n/a" in text
    verdict = text.strip().splitlines()[-1]
    assert "reproduced by: `normalized_units (not a valid evaluation)` (45.0% -> 43.0%)" in verdict
    assert "clamp_normalized" not in verdict


def test_section_reports_a_negative_result_as_such():
    text = forensics.section(_results({}))
    assert "No variant reproduces the paper's pattern on the undefended model (experts/benign): " \
           "a negative result. The correct protocol takes experts/benign from 5.0% (PGD-10) to " \
           "0.0% (PGD-100)." in text


def _project(tmp_path, tiny_params):
    """A project holding an undefended net and a mixture where the pipeline puts them."""
    arch = {"num_classes": 10, "width": 2, "mean": (0.3,), "std": (0.4,), "in_channels": 1}
    moe_arch = {"n_experts": 2, "expert": arch, "router_hidden": (8,), "input_shape": (1, 8, 8)}
    folder = tmp_path / "models" / "digits" / "run0"
    (folder / "experts").mkdir(parents=True)
    checkpoint.save(folder / "experts" / "benign.pt", {
        "arch": "resnet18", "arch_kwargs": arch, "dataset": "digits", "state_dict": _net().state_dict()})
    checkpoint.save(folder / "dwf.pt", {
        "arch": "softmoe", "arch_kwargs": moe_arch, "dataset": "digits",
        "state_dict": _mixture().state_dict()})


def test_cli_writes_the_sweep_and_prints_the_section(tmp_path, tiny_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _project(tmp_path, tiny_params)
    r = CliRunner().invoke(app, ["forensics", "--params", str(tiny_params), "--quiet"],
                            catch_exceptions=False)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "metrics/forensics/digits/run0.json").read_text())
    assert set(saved["models"]) == {"experts/benign", "dwf"}
    assert saved["models"]["experts/benign"]["variants"]["softmax_mixture"] is None
    assert saved["steps"] == list(forensics.STEPS) and saved["eps"] == 0.1
    assert saved["n_examples"] == 40  # the params' evaluate.n_examples
    assert saved["section"] == forensics.section(saved, label) and saved["section"] in r.stdout
    assert "DWF (ours)" in saved["section"]  # the tables' labels, not the pipeline's names


@pytest.mark.parametrize("args, says", [
    (["--out", "PARAMS"], "would overwrite"),
    (["--model", "experts/benign"], "each model once"),
    (["--model", "../x"], "--model"),
])
def test_cli_refuses_bad_input_with_exit_2(tmp_path, tiny_params, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    _project(tmp_path, tiny_params)
    args = [str(tiny_params) if a == "PARAMS" else a for a in args]
    r = CliRunner().invoke(app, ["forensics", "--params", str(tiny_params), *args])
    assert r.exit_code == 2 and says in r.stderr, r.output
