"""`dwf`: one thin command per pipeline stage. Reads params.yaml, passes plain values down.

Bad input (unknown dataset, eps outside [0, 1], missing checkpoint ...) ends with one line on
stderr and exit code 2, before any work starts.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Divided We Fall: soft-gated mixture of adversarially trained experts.")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
DatasetOpt = Annotated[str, typer.Option("--dataset", help="cifar10, svhn or digits")]
RunOpt = Annotated[int, typer.Option("--run", min=0, help="run index (seeds derive from seed + run)")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="override a value of this dataset's section, e.g. expert.epochs=2")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cuda or cpu (default: cuda if present)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def stage(fn):
    """Turn the package's input errors into one line and exit code 2."""
    from dwf.checkpoint import CheckpointError
    from dwf.config import ConfigError
    from dwf.data import DataError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, CheckpointError, DataError, ValueError, FileNotFoundError) as e:
            _fail(str(e))
    return wrapper


def _context(params_path: Path, dataset: str, overrides: list[str] | None, device: str | None):
    """Validated (params, profile, device) with determinism switched on."""
    from dwf.config import load_params
    from dwf.runtime import configure_determinism, pick_device

    params = load_params(params_path, dataset, overrides or [])
    configure_determinism()
    return params, params.profile(dataset), pick_device(device)


def _arch(dataset: str, profile) -> dict:
    from dwf.data import NUM_CLASSES, mean_std

    mean, std = mean_std(dataset, profile.normalization)
    return {"num_classes": NUM_CLASSES[dataset], "width": profile.width, "mean": mean, "std": std}


@app.command()
@stage
def download(dataset: DatasetOpt = "digits", params: ParamsOpt = Path("params.yaml"),
             quiet: QuietOpt = False):
    """Fetch a dataset into data/NAME as uint8 tensors with a checksummed manifest."""
    from dwf.config import load_params
    from dwf.data import download as fetch

    root = Path(load_params(params).data_root)
    typer.echo(f"{fetch(dataset, root, progress=not quiet)}")


@app.command("train-expert")
@stage
def train_expert(expert: Annotated[str, typer.Option(help="expert name, e.g. benign, fgsm_0, pgd_3")],
                 dataset: DatasetOpt = "digits", run: RunOpt = 0,
                 out: Annotated[Optional[Path], typer.Option(help="checkpoint path")] = None,
                 params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                 device: DeviceOpt = None, quiet: QuietOpt = False):
    """Pretrain one expert (Algorithms 1-2) on the training split."""
    from dwf.config import expert_kind
    from dwf.data import load_split
    from dwf.defenses.dwf import train_expert as train
    from dwf.runtime import derive_seed

    p, prof, dev = _context(params, dataset, set_, device)
    if expert not in p.experts:
        _fail(f"--expert: {expert!r} is not in params experts ({', '.join(p.experts)})")
    x, y = load_split(dataset, Path(p.data_root), "train")
    out = out or Path(f"models/{dataset}/run{run}/{expert}.pt")
    train(expert_kind(expert), x, y, cfg=prof.expert, arch_kwargs=_arch(dataset, prof),
          dataset=dataset, seed=derive_seed(p.seed + run, dataset, "expert", expert),
          flip=prof.flip, crop_padding=prof.crop_padding, out=out, device=dev, progress=not quiet)
    typer.echo(f"wrote {out}")


@app.command("train-joint")
@stage
def train_joint(dataset: DatasetOpt = "digits", run: RunOpt = 0,
                experts_dir: Annotated[Optional[Path], typer.Option(help="folder of expert checkpoints")] = None,
                out: Annotated[Optional[Path], typer.Option(help="checkpoint path")] = None,
                params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                device: DeviceOpt = None, quiet: QuietOpt = False):
    """Train the mixture end to end on [clean, FGSM, PGD] batches (Algorithm 3)."""
    from dwf.data import load_split
    from dwf.defenses.dwf import train_joint as train
    from dwf.runtime import derive_seed

    p, prof, dev = _context(params, dataset, set_, device)
    folder = experts_dir or Path(f"models/{dataset}/run{run}")
    paths = [folder / f"{name}.pt" for name in p.experts]
    x, y = load_split(dataset, Path(p.data_root), "train")
    out = out or folder / "dwf.pt"
    train(paths, x, y, cfg=prof.joint, router_hidden=prof.router_hidden, dataset=dataset,
          seed=derive_seed(p.seed + run, dataset, "joint"), flip=prof.flip,
          crop_padding=prof.crop_padding, out=out, device=dev, progress=not quiet)
    typer.echo(f"wrote {out}")


@app.command()
@stage
def evaluate(checkpoint: Annotated[Path, typer.Option(help="model checkpoint")],
             out: Annotated[Path, typer.Option(help="metrics JSON to write")],
             dataset: DatasetOpt = "digits", run: RunOpt = 0,
             params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
             device: DeviceOpt = None, quiet: QuietOpt = False):
    """Run the paper's attack protocol (Table 4) and write a metrics file."""
    from dwf.checkpoint import atomic_write, load_model
    from dwf.data import load_split
    from dwf.evaluate import evaluate as run_protocol
    from dwf.runtime import derive_seed

    p, prof, dev = _context(params, dataset, set_, device)
    model = load_model(checkpoint, dev, dataset=dataset)
    x, y = load_split(dataset, Path(p.data_root), "test")
    metrics = run_protocol(model, x, y, cfg=prof.evaluate, seed=derive_seed(p.seed + run, dataset, "evaluate"),
                           device=dev, progress=not quiet)
    metrics["checkpoint"] = str(checkpoint)
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    typer.echo(f"wrote {out}: clean {metrics['clean']:.2f}%, worst case {metrics['worst_case']:.2f}%")


@app.command()
@stage
def table(metrics: Annotated[list[Path], typer.Argument(help="metrics JSON files")]):
    """Print clean and robust accuracies of metrics files as a Markdown table."""
    from dwf.report import accuracy_table

    typer.echo(accuracy_table({m.stem: json.loads(m.read_text()) for m in metrics}))


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="dwf")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
