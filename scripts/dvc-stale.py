"""Let DVC's hashes decide what Snakemake reruns (`make study`).

Snakemake judges by file times; DVC by the hashes in dvc.lock. In the folder where Snakemake
built the pipeline the two agree (the Snakefile's rules read their code and params from
dvc.yaml), but file times carry no history: in a clone, after `dvc pull`, or after a run by
`dvc repro`, a stage that DVC calls current can look stale to Snakemake, and the other way round.
This script marks the outputs of every stage DVC calls current as just made (their file times
set to now, so no code or params file is newer) and prints one output of each stage DVC calls
stale, for `snakemake --forcerun`: Snakemake then reruns those, what reads them and what is
missing, two jobs at a time. Run it after Snakemake has written its params files (`snakemake -n`).

    cd studies/digits && python ../../scripts/dvc-stale.py dvc.yaml
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from dvc.repo import Repo


def stale_outputs(dvcfile: str) -> list[str]:
    """Mark the outputs of `dvcfile`'s current stages as just made, and return one output of
    each stale stage (forcing one output forces its job): the stage's first,
    which names its job alone (a checkpoint, an evaluation's headline file; a training curve's
    name would match both an expert's and a baseline's rule). A missing output needs no force."""
    repo = Repo(".")
    stale = set(repo.status(targets=[dvcfile]))
    files, now = [], time.time()
    for stage in repo.index.stages:
        if Path(stage.path).resolve() != Path(dvcfile).resolve():
            continue  # another pipeline of the repository (the paper's, a study's)
        if stage.addressing not in stale:
            for out in map(Path, (str(o.def_path) for o in stage.outs)):
                for made in [out, *out.rglob("*")] if out.is_dir() else [out]:
                    if made.exists():
                        os.utime(made, (now, now))
            continue
        if stage.addressing == "check_params" or not stage.outs:
            continue  # the params check has no Snakemake rule: the rules' wildcards refuse names
        path = Path(str(stage.outs[0].def_path))
        if path.is_dir():
            path = path / "manifest.json"  # a dataset: the file its rule declares, written last
        if path.is_file():
            files.append(str(path))
    return sorted(files)


if __name__ == "__main__":
    print(" ".join(stale_outputs(sys.argv[1] if len(sys.argv) > 1 else "dvc.yaml")))
