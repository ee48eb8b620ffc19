"""Print the files Snakemake must remake for the stages DVC calls stale (`make study`).

Snakemake judges by file times; DVC by the hashes in dvc.lock. In the folder where Snakemake
built the pipeline the two agree (the Snakefile's rules read their code and params from
dvc.yaml), but file times carry no history: after `dvc pull` and `snakemake --touch`, or in a
clone, a stage that DVC knows is stale can look up to date to Snakemake. `make study` hands
this list to `snakemake --forcerun`, so DVC's hashes decide what is stale and Snakemake reruns
it and everything downstream, two jobs at a time. A missing output needs no forcing.

    cd studies/digits && python ../../scripts/dvc-stale.py dvc.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from dvc.repo import Repo


def stale_outputs(dvcfile: str) -> list[str]:
    repo = Repo(".")
    stale = set(repo.status(targets=[dvcfile]))
    files = []
    for stage in repo.index.stages:
        if stage.addressing not in stale or stage.addressing == "check_params":
            continue  # the params check has no Snakemake rule: the rules' wildcards refuse names
        for out in stage.outs:
            path = Path(str(out.def_path))
            if path.is_file():
                files.append(str(path))
            elif path.is_dir() and (path / "manifest.json").is_file():
                files.append(str(path / "manifest.json"))  # a dataset: the file written last
            # reports/ is written by aggregate, whose metrics/summary.json stands for it
    return sorted(files)


if __name__ == "__main__":
    print(" ".join(stale_outputs(sys.argv[1] if len(sys.argv) > 1 else "dvc.yaml")))
