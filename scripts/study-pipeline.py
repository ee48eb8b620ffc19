"""Write studies/NAME/dvc.yaml from the root dvc.yaml: the same stages, run in the study's folder.

A study (e.g. the CPU digits study) is its own DVC pipeline folder with its own params.yaml,
dvc.lock, metrics and reports, so selecting it never edits the paper's params.yaml. DVC runs a
stage in the folder of its dvc.yaml, so the only difference is where the package sources are:
`src/...` deps become `../../src/...`. tests/test_study.py fails when a study's copy is stale.

    python scripts/study-pipeline.py digits      # rewrite studies/digits/dvc.yaml
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("# GENERATED from the root dvc.yaml by scripts/study-pipeline.py: edit that file, then\n"
          "# re-run the script. Stages run in this folder, with this folder's params.yaml.\n")


def study_pipeline(root_text: str) -> str:
    """The root pipeline's text with every package-source path made relative to studies/NAME."""
    return HEADER + re.sub(r"(?m)^(\s+- )src/", r"\1../../src/", root_text)


def main(name: str) -> None:
    folder = ROOT / "studies" / name
    if not (folder / "params.yaml").is_file():
        sys.exit(f"error: {folder}/params.yaml not found: a study is a folder with its own params")
    (folder / "dvc.yaml").write_text(study_pipeline((ROOT / "dvc.yaml").read_text()))
    print(f"wrote {folder / 'dvc.yaml'}")


if __name__ == "__main__":
    main(*sys.argv[1:2] or ["digits"])
