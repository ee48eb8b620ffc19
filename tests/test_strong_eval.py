"""Attacks aimed at the mixture, AutoAttack, resumable evaluation, and the strong-eval metrics."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from _models import EPS, digits_root, first_test_images, mixture, trained

from dwf import adaptive, attacks, audit, metricsfile, models
from dwf import evaluate as ev
from dwf.config import EvalConfig
from dwf.data import load_split
from dwf.metricsfile import AttackRecord

CFG = EvalConfig(n_examples=24, batch_size=12, fgsm_eps=(EPS,), pgd_eps=EPS, pgd_alpha=EPS / 4,
                 pgd_steps=(4,), ms_steps=4, ms_restarts=1, adaptive_steps=4, strong_steps=8,
                 autoattack_n=12, audit=False, square_queries=20)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return digits_root(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def plain(root):
    return trained("benign", str(root), 3)


def test_weakest_expert_and_gate_attack(root, plain):
    x, y = first_test_images(root, 24)
    untrained = models.build("resnet18", num_classes=10, width=4, mean=(0.5,), std=(0.5,),
                             in_channels=1).eval()
    moe = mixture(plain, untrained)
    k = adaptive.weakest_expert(moe, x, y)
    with torch.no_grad():
        margins = torch.stack([attacks.margin(e(x), y) for e in moe.experts], dim=1)
    assert torch.equal(k, margins.argmax(1))
    x_adv = adaptive.gate_attack(moe, x, y, eps=EPS, alpha=EPS / 4, steps=8, seed=0)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    rows = torch.arange(len(k))
    with torch.no_grad():  # the gate moved toward the weakest expert
        assert moe.gate_weights(x_adv)[rows, k].mean() > moe.gate_weights(x)[rows, k].mean()


def test_autoattack_cascade_is_monotone(root, plain):
    x, y = first_test_images(root, 12)
    flags = adaptive.autoattack(plain, x, y, eps=EPS, seed=0, square_queries=20)
    assert list(flags) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    with torch.no_grad():
        clean = plain(x).argmax(1) == y
    previous = clean
    for f in flags.values():  # each attack only removes examples
        assert not (f & ~previous).any()
        previous = f
    assert previous.float().mean() < clean.float().mean()


def test_evaluate_reports_every_group_and_resumes(root, plain, tmp_path, monkeypatch):
    x, y = load_split("digits", root, "test")
    moe = mixture(plain, plain)
    kw = dict(cfg=CFG, seed=0, device=CPU, progress=False, sources={"plain": plain}, state=tmp_path)
    metrics = ev.evaluate(moe, x, y, **kw)
    assert set(metrics["strong"]) == {"pgd_dlr", "pgd_margin", "gate", "expert_0", "expert_1",
                                      "transfer_plain"}
    assert set(metrics["autoattack"]) >= {"apgd-ce", "apgd-t", "fab-t", "square"}
    every = [metrics["clean"], *metrics["strong"].values(), *metrics["pgd"].values()]
    assert metrics["worst_case"] <= min(every)
    assert len(metrics["per_example"]["worst_case_correct"]) == CFG.n_examples
    assert metricsfile.join(*metricsfile.split(metrics)) == metrics  # the two files lose nothing

    def refuse(*a, **k):
        raise AssertionError("a finished batch was recomputed")
    monkeypatch.setattr(attacks, "pgd", refuse)
    monkeypatch.setattr(attacks, "pgd_iterates", refuse)
    monkeypatch.setattr(adaptive, "autoattack", refuse)
    again = ev.evaluate(moe, x, y, **kw)
    assert {k: again[k] for k in ("worst_case", "strong", "autoattack")} == \
        {k: metrics[k] for k in ("worst_case", "strong", "autoattack")}


def test_corrupt_mistyped_or_stale_resume_batches_are_recomputed(root, plain, tmp_path, capsys):
    x, y = load_split("digits", root, "test")
    kw = dict(cfg=dataclasses.replace(CFG, strong=False, autoattack=False), seed=0, device=CPU,
              progress=False, state=tmp_path)
    metrics = ev.evaluate(plain, x, y, **kw)
    first, second = tmp_path / "0__clean.pt", tmp_path / "1__pgd.pt"
    key = torch.load(first, weights_only=True)["key"]
    first.write_bytes(b"PK\x03\x04 cut short")
    torch.save({"key": key, "result": {"pgd/10": "yes"}}, second)
    capsys.readouterr()
    again = ev.evaluate(plain, x, y, **kw)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("resuming: ") and "saved part(s)" in err[0]  # what the rerun found
    # said once, for whichever of the two broken parts was reached first
    assert len(err) == 2, err
    assert "0__clean.pt: unreadable" in err[1] or "1__pgd.pt: holds results of an unexpected" in err[1]
    assert again == metrics

    other = ev.evaluate(plain, x[24:], y[24:], **kw)  # other images: the saved batches are stale
    assert "another model, data" in capsys.readouterr().err
    assert other["per_example"] != metrics["per_example"]


def test_a_resumed_evaluation_with_other_transfer_weights_is_recomputed(root, plain, tmp_path, capsys):
    x, y = load_split("digits", root, "test")
    cfg = dataclasses.replace(CFG, n_examples=16, batch_size=16, autoattack=False, audit=False)
    kw = dict(cfg=cfg, seed=0, device=CPU, progress=False, state=tmp_path)
    source = copy.deepcopy(plain)
    ev.evaluate(plain, x, y, **kw, sources={"s": source})
    capsys.readouterr()
    with torch.no_grad():
        next(source.parameters()).mul_(-1)  # a retrained source under the same name
    ev.evaluate(plain, x, y, **kw, sources={"s": source})
    assert "another model, data" in capsys.readouterr().err


def test_worst_case_counts_subset_attacks_only_where_they_ran():
    flags = {"clean": torch.tensor([True, True, True]), "aa": torch.tensor([False])}
    assert ev.worst_case(flags).tolist() == [False, True, True]


@pytest.mark.slow
def test_undefended_falls_where_adversarial_training_holds(root, plain):
    x, y = first_test_images(root, 120)
    robust = trained("pgd", str(root), 4)
    acc = {}
    for name, m in {"plain": plain, "robust": robust}.items():
        x_adv = attacks.pgd(m, x, y, eps=EPS, alpha=EPS / 4, steps=20, seed=0)
        with torch.no_grad():
            acc[name] = (m(x_adv).argmax(1) == y).float().mean().item()
    assert acc["plain"] <= 0.1
    assert acc["robust"] >= acc["plain"] + 0.3


def test_worst_case_is_taken_at_the_threat_model_eps():
    """FGSM beyond pgd_eps is another threat model: reported, not folded into the worst case."""
    t, f = True, False
    flags = {"clean": torch.tensor([t, t]), "fgsm/0.05": torch.tensor([t, f]),
             "fgsm/0.2": torch.tensor([f, f]), "pgd/10": torch.tensor([t, t])}
    records = {"clean": ev.CLEAN, "pgd/10": AttackRecord("pgd", "ce", 0.1, 10, 1, "model", "PGD-10"),
               **{f"fgsm/{e:g}": AttackRecord("fgsm", "ce", e, 1, 1, "model", "") for e in (0.05, 0.2)}}
    out = ev.summarize(flags, records, eps=0.1)
    assert out["worst_case"] == 50.0 and out["fgsm"]["0.2"] == 0.0


def test_the_budget_and_families_come_from_the_records_not_the_names():
    """An attack's eps and family are read from its record: a name that says otherwise is
    ignored (issue 14: attacks described by data)."""
    t, f = True, False
    flags = {"clean": torch.tensor([t, t]), "fgsm/0.01": torch.tensor([f, f]),
             "strong/x": torch.tensor([t, f])}
    records = {"clean": ev.CLEAN,
               "fgsm/0.01": AttackRecord("fgsm", "ce", 0.3, 1, 1, "model", "FGSM 0.3"),   # beyond eps
               "strong/x": AttackRecord("pgd_ms", "dlr", 0.1, 5, 2, "model", "x")}
    assert ev.summarize(flags, records, eps=0.1)["worst_case"] == 50.0
    assert ev.by_family(flags, records, eps=0.1) == {"pgd_ms": 50.0}
    assert ev.coverage(flags, records, 2) == {"clean": 2, "fgsm": 2, "pgd_ms": 2}


def test_every_attack_of_the_suites_has_a_record_with_its_real_budget():
    """The records of the paper's protocol and of the strong suite (a mixture with a transfer
    source) say what each function runs: family, eps, steps, restarts and target."""
    cfg = dataclasses.replace(CFG, ms_steps=7, ms_restarts=3, adaptive_steps=6, strong_steps=5,
                              strong_restarts=2)
    moe = mixture(*(models.ResNet18(num_classes=10, width=2, in_channels=1, mean=(0.5,), std=(0.5,))
                    for _ in range(2)))
    suite = ev.protocol(cfg) | ev.strong_suite(cfg, moe, {"src": moe.expert(0)})
    records = {k: r for e in suite.values() for k, r in e.records.items()}
    assert records[f"pgd{7}_ms"] == AttackRecord("pgd_ms", "ce", cfg.pgd_eps, 7, 3, "model", "PGD-7 (MS)")
    assert records[f"pgd{6}_adaptive"].steps == 6 and records[f"pgd{6}_adaptive"].restarts == 1
    assert {r.eps for k, r in records.items() if r.family == "fgsm"} == set(cfg.fgsm_eps)
    assert {k for k, r in records.items() if r.family == "pgd"} == {f"pgd/{k}" for k in cfg.pgd_steps}
    assert records["strong/gate"].target == "gate"
    assert records["strong/expert_1"] == AttackRecord("strong", "ce", cfg.pgd_eps, 5, 2, "expert_1", "expert 1")
    assert records["strong/transfer_src"].target == "transfer:src"
    aa = adaptive.autoattack_records(eps=0.1, square_queries=300)
    assert (aa["apgd-t"].restarts, aa["square"].steps, aa["square"].loss) == (9, 300, "square")


def test_the_audit_judges_square_by_autoattacks_own_square_without_a_second_run(root, plain,
                                                                                 monkeypatch):
    """AutoAttack's Square ran on every example its gradient attacks left (a superset of what
    every white-box attack left), so the audit's Square check reads it instead of running a
    second 5000-query Square (issue 12: no duplicated passes); with AutoAttack on a first-N
    subset smaller than the audited examples, the audit runs its own."""
    x, y = load_split("digits", root, "test")
    # a small ball: most examples survive the white-box attacks, so a Square would run
    cfg = dataclasses.replace(CFG, n_examples=12, autoattack_n=0, audit=True, audit_n=12,
                              pgd_eps=0.02, pgd_alpha=0.005, fgsm_eps=(0.02,))
    calls = []
    real = adaptive.square
    monkeypatch.setattr(adaptive, "square", lambda *a, **k: calls.append(1) or real(*a, **k))
    metrics = ev.evaluate(plain, x, y, cfg=cfg, seed=0, device=CPU, progress=False)
    check = metrics["audit"]["square_vs_whitebox"]["value"]
    assert check["square_run"] == "autoattack" and not calls
    worst = torch.tensor([c == "1" for c in metrics["per_example"]["worst_case_correct"]])
    assert check["then_square"] == audit.accuracy(worst)  # white-box, then Square: the worst case
    mine = ev.evaluate(plain, x, y, cfg=dataclasses.replace(cfg, autoattack_n=6), seed=0, device=CPU,
                       progress=False)
    assert mine["audit"]["square_vs_whitebox"]["value"]["square_run"] == "audit" and calls


@pytest.mark.slow  # AutoAttack standard twice where nothing falls: 4 min beside the slow tier
def test_evaluation_writes_no_weight_gradient_and_restores_the_flags(root, plain):
    """FAB calls `.backward()`: on trainable weights it computes and stores their gradients;
    the evaluation freezes the weights around its attacks (models.frozen), then restores them."""
    eps = 0.01  # small: examples survive APGD, so FAB runs
    cfg = dataclasses.replace(CFG, n_examples=4, batch_size=4, autoattack_n=4, pgd_eps=eps,
                              pgd_alpha=eps / 4, fgsm_eps=(eps,))
    x, y = first_test_images(root, 4)
    model = copy.deepcopy(plain)
    flags = adaptive.autoattack(model, x, y, eps=eps, seed=0, square_queries=20)
    assert flags["apgd-t"].any()  # FAB had examples to attack
    assert any(p.grad is not None for p in model.parameters())  # what freezing prevents
    model = copy.deepcopy(plain)
    x_u8, y_all = load_split("digits", root, "test")
    ev.evaluate(model, x_u8, y_all, cfg=cfg, seed=0, device=CPU, progress=False)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
