"""Record in dvc.lock the stages a stopped `make study` finished, and only those.

`make study` commits the whole pipeline when Snakemake is done (`dvc commit -f dvc.yaml`). A run
stopped before that (a session's end, Ctrl-C) leaves finished jobs that DVC still calls stale, so
the next `make study` would redo them. This commits each stage DVC calls stale whose every output
Snakemake recorded as made by a job that ended after SINCE (its metadata in .snakemake/metadata,
the job not in .snakemake/incomplete): the judge is Snakemake's record of a finished job, never a
file's time, which a `git checkout` or `dvc pull` also sets. The rest stay stale and are rerun.

    cd studies/digits && python ../../scripts/dvc-commit-finished.py dvc.yaml SINCE_EPOCH_SECONDS
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from dvc.repo import Repo


def _key(path: str) -> str:
    """Snakemake's file name for a path's records (.snakemake/metadata, .snakemake/incomplete)."""
    return base64.urlsafe_b64encode(path.encode()).decode()


def finished_since(path: str, since: float) -> bool:
    """Whether Snakemake's last job that wrote `path` completed after `since`."""
    record = Path(".snakemake/metadata") / _key(path)
    if not Path(path).exists() or not record.is_file() or (Path(".snakemake/incomplete") / _key(path)).exists():
        return False
    return json.loads(record.read_text()).get("endtime", 0) >= since


def main(dvcfile: str, since: float) -> int:
    repo = Repo(".")
    stale = set(repo.status(targets=[dvcfile]))
    done = []
    for stage in repo.index.stages:
        if stage.addressing not in stale or Path(stage.path).resolve() != Path(dvcfile).resolve():
            continue
        outs = [str(o.def_path) for o in stage.outs]
        # a folder output (data/<dataset>): Snakemake records the file it declares inside
        files = [o if not Path(o).is_dir() else str(Path(o) / "manifest.json") for o in outs]
        if outs and all(finished_since(f, since) for f in files):
            repo.commit(stage.addressing, force=True)
            done.append(stage.addressing)
    left = len(stale) - len(done)
    print(f"committed {len(done)} finished stage(s); {left} stale stage(s) left to run", file=sys.stderr)
    print("\n".join(done))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
