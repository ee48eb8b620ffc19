"""Where each stage reads and writes. dvc.yaml and the Snakefile spell the same patterns."""

from __future__ import annotations

from pathlib import Path


def model(dataset: str, run: int, name: str) -> Path:
    """Checkpoint of the mixture ('dwf'), a baseline, or an expert named 'experts/<name>'."""
    return Path(f"models/{dataset}/run{run}/{name}.pt")


def expert(dataset: str, run: int, name: str) -> Path:
    """Checkpoint of a pretrained expert; the joint stage depends on their whole folder."""
    return model(dataset, run, f"experts/{name}")


def history(dataset: str, run: int, name: str) -> Path:
    """Per-epoch training curve (a DVC plot)."""
    return Path(f"metrics/runs/{dataset}/run{run}/train/{name}.json")


def evaluation(dataset: str, run: int, name: str) -> Path:
    """Metrics of one evaluated checkpoint."""
    return Path(f"metrics/runs/{dataset}/run{run}/eval/{name}.json")
