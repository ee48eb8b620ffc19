"""Where each stage reads and writes. dvc.yaml and the Snakefile spell the same patterns.

Every path is built from checked names (config.base: one rule for names), so a pipeline path
stays inside its output folder whatever a caller passes; only an explicit --out goes elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dwf.config.base import EXPERT_NAME, MODEL_NAME, NAME, ConfigError, check, check_name

# `dwf evaluate --external ARCH` writes eval/external_<ARCH with ":" as "_">.json; timm names
# hold dots (convnext_tiny.fb_in1k), which stay inside one path component
EXTERNAL_NAME = re.compile(r"external_[a-z0-9_.]{1,64}")

# What the pipeline's commands write, relative to the project root: model and expert (models/),
# history and evaluation (metrics/runs/), forensics, and aggregate's summary, its models'
# metrics and reports. Only the pipeline's own invocation writes here (cli._refuse_pipeline):
# an ad-hoc result there would replace a tracked one, or sit among them unnoticed (issue 23).
SUMMARY = Path("metrics/summary.json")
MODEL_ROWS = SUMMARY.parent / "models"  # a row a model, beside the summary (report.publish)
REPORTS = Path("reports")
PIPELINE_OUTPUTS = (Path("models"), Path("metrics/runs"), Path("metrics/forensics"), MODEL_ROWS,
                    SUMMARY, REPORTS)

# a pipeline expert as a mixture lists it (dwf train-joint): models/<dataset>/run<r>/experts/<name>.pt
EXPERT_FILE = re.compile(rf"models/{NAME.pattern}/run[0-9]+/experts/(?:{EXPERT_NAME.pattern})\.pt")


def _run_dir(dataset: str, run: int) -> str:
    check_name(dataset, "dataset")
    check(isinstance(run, int) and not isinstance(run, bool) and run >= 0, "run",
          f"an integer >= 0, got {run!r}")
    return f"{dataset}/run{run}"


def model(dataset: str, run: int, name: str) -> Path:
    """Checkpoint of the mixture ('dwf'), a baseline, or an expert named 'experts/<name>'."""
    check_name(name, "model", MODEL_NAME)
    return Path(f"models/{_run_dir(dataset, run)}/{name}.pt")


def expert(dataset: str, run: int, name: str) -> Path:
    """Checkpoint of a pretrained expert (a DVC dep of the joint and evaluate stages, file by file)."""
    check_name(name, "expert", EXPERT_NAME)
    return model(dataset, run, f"experts/{name}")


def history(dataset: str, run: int, name: str) -> Path:
    """Per-epoch training curve (a DVC plot) of an expert, the mixture or a baseline."""
    check_name(name, "model")
    return Path(f"metrics/runs/{_run_dir(dataset, run)}/train/{name}.json")


def evaluation(dataset: str, run: int, name: str) -> Path:
    """Metrics of one evaluated checkpoint: a pipeline model, or an external classifier."""
    if not (isinstance(name, str) and EXTERNAL_NAME.fullmatch(name)):
        check_name(name, "model", MODEL_NAME)
    return Path(f"metrics/runs/{_run_dir(dataset, run)}/eval/{name}.json")


def forensics(dataset: str, run: int) -> Path:
    """Protocol forensics of one run (dwf forensics; the comparison page's last section)."""
    return Path(f"metrics/forensics/{_run_dir(dataset, run)}.json")


def pipeline_output(path: Path) -> Path | None:
    """The pipeline location (PIPELINE_OUTPUTS) that `path` is, lies in or holds, or None.
    Locations count under the working directory (where the pipeline's commands run) and under
    every folder above `path` that holds a dvc.yaml (a study, named from outside it)."""
    a = Path(os.path.abspath(path))  # symlinks kept, as cli._refuse_overlap
    roots = [Path.cwd(), *(p for p in a.parents if (p / "dvc.yaml").is_file())]
    for rel in (a.relative_to(root) for root in roots if root in a.parents):
        for place in PIPELINE_OUTPUTS:
            if rel == place or place in rel.parents or rel in place.parents:
                return place
    return None


def listed_expert(entry: Any, mixture: Path) -> Path:
    """One expert a mixture's checkpoint lists, as a path, checked before any file is opened: a
    pipeline expert (EXPERT_FILE), relative to the mixture's project root or absolute with that
    tail (a mixture trained outside its experts' project). A checkpoint may come from anyone:
    what it names must not make dwf read a file of its choosing (/etc/hostname)."""
    p = Path(entry) if isinstance(entry, str) else None
    tail = "/".join(p.parts[-5:]) if p is not None else ""
    if p is None or ".." in p.parts or not EXPERT_FILE.fullmatch(tail) or not (
            p.is_absolute() or len(p.parts) == 5):
        raise ConfigError(f"{mixture}: lists {str(entry)[:80]!r} as an expert, not a path "
                          "models/<dataset>/run<r>/experts/<name>.pt; refused, nothing opened")
    return p


def project_root(checkpoint: Path) -> Path | None:
    """The project a checkpoint at <root>/models/<dataset>/run<r>/<name>.pt belongs to (the
    folder its pipeline ran in), or None for a checkpoint elsewhere. Symlinks are not followed:
    DVC may link a checkpoint into its cache."""
    c = Path(os.path.abspath(checkpoint))
    layout = len(c.parents) > 3 and c.parents[2].name == "models" and re.fullmatch(r"run\d+", c.parent.name)
    return c.parents[3] if layout else None


def timing(history_path: Path) -> Path:
    """Wall-clock seconds and machine of a training run: logs/timing/... for a pipeline curve
    (git-ignored and outside metrics/, so no DVC dep or tracked file changes with the clock),
    beside the curve as <name>.timing.json for an ad-hoc one."""
    parts = Path(history_path).parts
    if len(parts) > 2 and parts[:2] == ("metrics", "runs"):
        return Path("logs", "timing", *parts[2:])
    return Path(history_path).with_suffix(".timing.json")
