"""Write studies/NAME/dvc.yaml from the root dvc.yaml: the same stages, run in the study's folder.

A study (e.g. the CPU digits study) is its own DVC pipeline folder with its own params.yaml,
dvc.lock, metrics and reports, so selecting it never edits the paper's params.yaml. DVC runs a
stage in the folder of its dvc.yaml, so two things differ: where the package sources are
(`src/...` deps become `../../src/...`), and where its cached outputs are pushed: the DVC remote
named after the study (.dvc/config: `digits`, a folder inside the repository, so a clone carries
the study's checkpoints), set on each cached output as `remote: NAME`. The paper's pipeline
keeps the default remote. A study declares its models' summary rows as its DVC metrics.
tests/test_study.py fails when a study's copy is stale.

    python scripts/study-pipeline.py digits      # rewrite studies/digits/dvc.yaml
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("# GENERATED from the root dvc.yaml by scripts/study-pipeline.py: edit that file, then\n"
          "# re-run the script. Stages run in this folder, with this folder's params.yaml;\n"
          "# cached outputs are pushed to the remote named after the study (.dvc/config).\n")


def _outs_to_remote(text: str, remote: str) -> str:
    """`text` with each cached output (a bare path under an `outs:` key; the `cache: false`
    ones are mappings already and never pushed) given `remote: REMOTE`."""
    lines, key = [], None
    for line in text.splitlines(keepends=True):
        if m := re.match(r"^\s*(\w+):\s*$", line):
            key = m.group(1)
        elif key == "outs" and (m := re.match(r"^(\s+)- ([^\s:]+)\n$", line)):
            line = f"{m.group(1)}- {m.group(2)}:\n{m.group(1)}    remote: {remote}\n"
        lines.append(line)
    return "".join(lines)


# A study is built and committed, so its models' rows are what `dvc metrics show` lists (from
# the root too); the paper's pipeline declares no metrics, whose files exist only once built.
METRICS = ("\nmetrics:\n  # a row a model: mean and std over runs (dwf.report.model_metrics)\n"
           "  - metrics/models\n")


def study_pipeline(root_text: str, name: str = "digits") -> str:
    """The root pipeline's text for studies/NAME: package-source paths made relative to the
    study's folder, cached outputs pushed to the remote NAME, the models' rows as metrics."""
    text = re.sub(r"(?m)^(\s+- )src/", r"\1../../src/", root_text)
    return HEADER + _outs_to_remote(text, name) + METRICS


def main(name: str) -> None:
    folder = ROOT / "studies" / name
    if not (folder / "params.yaml").is_file():
        sys.exit(f"error: {folder}/params.yaml not found: a study is a folder with its own params")
    if f'remote "{name}"' not in (ROOT / ".dvc" / "config").read_text():
        sys.exit(f"error: .dvc/config has no remote {name!r}: a study's outputs go to the remote "
                 f"named after it (from the repository root: dvc remote add {name} studies/{name}/remote)")
    (folder / "dvc.yaml").write_text(study_pipeline((ROOT / "dvc.yaml").read_text(), name))
    print(f"wrote {folder / 'dvc.yaml'}")


if __name__ == "__main__":
    main(*sys.argv[1:2] or ["digits"])
