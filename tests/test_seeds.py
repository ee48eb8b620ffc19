"""Independent runs are independent: every stream derives from the pair (seed, run)."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from dwf.checkpoint import load
from dwf.cli import app
from dwf.runtime import derive_seed


def test_seed_and_run_are_a_pair_not_a_sum():
    streams = {(s, r): derive_seed(s, r, "digits", "expert", "benign") for s in range(3) for r in range(3)}
    assert len(set(streams.values())) == len(streams)  # (1, 0) != (0, 1), (2, 0) != (1, 1) ...


def _train(tmp_path, params, seed: int, run: int):
    out = tmp_path / f"s{seed}r{run}.pt"
    result = CliRunner().invoke(app, [
        "train-expert", "--expert", "benign", "--params", str(params), "--dataset", "digits",
        "--run", str(run), "--out", str(out), "--history", str(tmp_path / f"s{seed}r{run}.json"),
        "--quiet", "--set", "expert.epochs=1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return load(out)["state_dict"]


def test_seed_1_run_0_and_seed_0_run_1_train_different_weights(tmp_path, tiny_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tiny_params.read_text()
    shifted = tmp_path / "seed1.yaml"
    shifted.write_text(text.replace("seed: 0", "seed: 1", 1))
    a, b = _train(tmp_path, shifted, 1, 0), _train(tmp_path, tiny_params, 0, 1)
    assert any(not torch.equal(a[k], b[k]) for k in a)
