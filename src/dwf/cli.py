"""`dwf`: one thin command per pipeline stage. Reads params.yaml, passes plain values down.

Bad input (unknown dataset, eps outside [0, 1], missing checkpoint ...) ends with one line on
stderr and exit code 2, before any work starts.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dwf.config import DEFENSES  # the registry of baselines: --defense's choices
from dwf.config.base import MAX_BATCH, MAX_STEPS, MAX_WIDTH  # bounds of the counts options take

# rich_markup_mode=None: help texts print as written (click's plain formatter); rich's markup
# would eat "[clean, FGSM, PGD]" as a style tag (tests/test_cli.py renders every command's help)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Divided We Fall: soft-gated mixture of adversarially trained experts.")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
DatasetOpt = Annotated[str, typer.Option("--dataset", help="cifar10, svhn or digits")]
RunOpt = Annotated[int, typer.Option("--run", min=0, help="run index (seeds derive from the pair (seed, run))")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="override a value of this dataset's section, e.g. expert.epochs=2")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cuda or cpu (default: cuda if present)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", min=0, max=256, help="processes for the evaluation's independent parts (0: every "
    "CPU; 1 on a GPU); the results do not depend on it")]
CkptOutOpt = Annotated[Optional[Path], typer.Option("--out", help="checkpoint path")]
DvcOpt = Annotated[bool, typer.Option(
    "--dvc", help="take the names (dataset, run, ...) from the DVC stage running this command "
                  "($DVC_STAGE) and the params file: dvc.yaml's commands carry no params value")]
HistoryOpt = Annotated[Optional[Path], typer.Option("--history", help="training curve JSON")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def stage(fn):
    """Turn the package's input errors into one line and exit code 2."""
    # ConfigError and CheckpointError are ValueErrors; not importing dwf.checkpoint here keeps
    # the model code out of stages that do not load models (download, aggregate: their DVC deps)
    from dwf.data import DataError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DataError, ValueError, FileNotFoundError) as e:
            _fail(str(e))
    return wrapper


def _context(params_path: Path, dataset: str, overrides: list[str] | None, device: str | None,
             data_parallel: bool = False):
    """Validated (params, profile, device) with determinism switched on.

    Under torchrun a training stage (data_parallel) joins the process group and gets its
    rank's device (dwf.distributed); any other stage refuses to run as several processes.
    """
    import torch

    from dwf import distributed
    from dwf.config import ConfigError, check_name, load_params
    from dwf.runtime import configure_determinism, pick_device

    check_name(dataset, "--dataset")
    params = load_params(params_path, dataset, overrides or [])
    configure_determinism()
    # a CPU sum's order depends on the thread count: take it from params, not the environment
    torch.set_num_threads(params.cpu_threads)
    if distributed.world_size() > 1 and not data_parallel:
        raise ConfigError("this stage runs as one process; only training stages run under torchrun")
    _, dev = distributed.init(pick_device(device))
    return params, params.profile(dataset), dev


def _finish_training(history_path: Path, curve: list[dict], out: Path) -> None:
    """Write the training curve, and under logs/timing/ the wall-clock seconds of each epoch and
    the machine, which the checkpoint and the curve leave out to stay byte-identical across
    reruns; then say so. On the main process only (dwf.distributed)."""
    from dwf import distributed, paths
    from dwf.checkpoint import environment

    if distributed.world().main:
        _write_history(history_path, curve)
        _write_json(paths.timing(history_path), {
            "environment": environment(), "seconds": [h["seconds"] for h in curve]})
        typer.echo(f"wrote {out}")


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    from dwf.fileio import atomic_write

    atomic_write(path, lambda f: f.write(text.encode()))


def _write_history(path: Path, history: list[dict]) -> None:
    """The training curve as a DVC plot; wall times left out so reruns are byte-identical."""
    from dwf.train import without_timings

    _write_json(path, without_timings(history))


def _outputs(named: dict[str, Optional[Path]], pipeline: list[Path], beside: list[str], *,
             inputs: list[Optional[Path]], adhoc: Optional[Path] = None,
             departs: Optional[dict[str, object]] = None) -> list[Path]:
    """Where a command writes: nothing the pipeline owns is written by an ad-hoc command.

    Args:
        named: the output options as given ({"--out": path or None, ...}), the main one first.
        pipeline: the paths dvc.yaml declares for them: used when none is named and no input
            is ad hoc (a companion named without the main output is refused: it would part from
            the pipeline's main output).
        beside: per output, the suffix deriving it from the main one (--out x.pt ->
            x.history.json), or for the main one, from `adhoc` (--checkpoint x.pt -> x.eval.json).
        inputs: every file or folder the command reads (_refuse_overlap).
        adhoc: an input named instead of the pipeline's (--checkpoint); outputs go beside it.
        departs: the options the pipeline's command line lacks, as given ({"--set": [...]});
            any set makes this run ad hoc (_refuse_pipeline).
    Returns:
        the output paths, in the order of `named`.
    """
    (flag, main), *companions = named.items()
    if main is None and adhoc is not None:
        main = adhoc.with_suffix(beside[0])
    if main is None:
        given = [f for f, path in companions if path is not None]
        if given:
            raise ValueError(f"{given[0]} needs {flag}: without {flag} this command writes the "
                             "pipeline's outputs, which go together")
        outs = list(pipeline)
    else:
        outs = [main] + [path or main.with_suffix(s) for (_, path), s in zip(companions, beside[1:])]
    _refuse_overlap(outs, inputs)
    _refuse_pipeline(outs, pipeline, departs)
    return outs


def _refuse_pipeline(outputs: list[Path], own: list[Path],
                     departs: Optional[dict[str, object]] = None) -> None:
    """Pipeline outputs (paths.PIPELINE_OUTPUTS) are written only by the pipeline's own
    invocation: a command's own default outputs (`own`), on the pipeline's command line. A run
    with any of `departs` given (--set, an input of its choosing) would replace a tracked
    result with one of other settings (issue 23: a 20-example evaluation over the study's 360,
    JSON over a checkpoint)."""
    import os

    from dwf import paths

    given = [flag for flag, value in (departs or {}).items() if value]
    mine = {Path(os.path.abspath(p)) for p in own}
    shown = {p: str(p) + ("" if p.suffix else "/") for p in paths.PIPELINE_OUTPUTS}
    instead = ", ".join(shown.values())
    for o in outputs:
        place = paths.pipeline_output(o)
        if place is None:
            continue
        if given:
            raise ValueError(f"{given[0]} makes this an ad-hoc run, which may not write {o} (the "
                             f"pipeline's {shown[place]}); name --out outside {instead}")
        if Path(os.path.abspath(o)) not in mine:
            raise ValueError(f"{o} (the pipeline's {shown[place]}) is not this command's own "
                             f"output; name one outside {instead}")


def _refuse_overlap(outputs: list[Path], inputs: list[Optional[Path]]) -> None:
    """No output may be an input, lie inside an input folder, or hold an input (a folder output
    is replaced whole), and no two outputs may be one file."""
    import os

    ins = [(i, Path(os.path.abspath(i))) for i in inputs if i is not None]
    seen: set[Path] = set()
    for o in outputs:
        a = Path(os.path.abspath(o))  # symlinks kept: DVC may link an input into its cache
        for i, b in ins:
            if a == b or b in a.parents or a in b.parents:
                raise ValueError(f"output {o} would overwrite {i}, an input of this command; "
                                 "name another output")
        if a in seen:
            raise ValueError(f"{o}: named for two outputs of this command")
        seen.add(a)


def _dvc_item(params_path: Path, lists: tuple[str, ...]) -> tuple:
    """The names of the DVC stage running this command, checked against the params file.

    DVC puts a stage's params values into its command line before anything can check them, and
    a name can end a shell quote (issue 23). So dvc.yaml's commands are constant (`--dvc`): DVC
    names the stage in $DVC_STAGE ("[path/dvc.yaml:]expert@digits-0-benign", its matrix key the
    item's values joined by "-"), and the item is the one combination of the params lists
    `lists` (e.g. datasets, runs, experts) with that key; load_params refuses a bad name first.
    """
    import itertools
    import os

    from dwf.config import load_params

    addressing = os.environ.get("DVC_STAGE", "")
    if "@" not in addressing:
        raise ValueError("--dvc: no DVC stage in $DVC_STAGE (DVC sets it for the stages it runs); "
                         "name the dataset, run and model with their options instead")
    stage_name = addressing.rsplit(":", 1)[-1]  # "studies/digits/dvc.yaml:expert@..." -> "expert@..."
    key = stage_name.partition("@")[2]
    p = load_params(params_path)
    items = [c for c in itertools.product(*(getattr(p, name) for name in lists))
             if "-".join(map(str, c)) == key]
    if len(items) != 1:
        raise ValueError(f"--dvc: DVC stage {stage_name[:80]!r} is not one item of "
                         f"{' x '.join(lists)} in {params_path}")
    return items[0]


def _given(value: Optional[str], option: str) -> str:
    """A name option that is required unless --dvc gives it."""
    if value is None:
        raise ValueError(f"{option}: required (or --dvc in a DVC stage)")
    return value


def _arch(dataset: str, profile) -> dict:
    """ResNet-18 arguments of a profile; the input channels come from the data (data.SHAPE),
    so a checkpoint says what images it takes."""
    from dwf.data import NUM_CLASSES, SHAPE, mean_std

    mean, std = mean_std(dataset, profile.normalization)
    return {"num_classes": NUM_CLASSES[dataset], "width": profile.width, "mean": mean, "std": std,
            "in_channels": SHAPE[dataset][0]}


@app.command("check-params")
@stage
def check_params(params: ParamsOpt = Path("params.yaml"),
                 out: Annotated[Optional[Path], typer.Option(
                     help="marker written once every value passes (a DVC dep of every stage)")] = None):
    """Validate the whole params file, every name a stage's command line carries included.

    dvc.yaml runs this before any other stage: DVC builds each command line from params
    before `dwf` can refuse a name, so a name that could break out of the shell's quoting
    must be refused here, by a command whose own line carries no params value.
    """
    from dwf.config import load_params

    p = load_params(params)
    if out is not None:  # constant bytes: a passing check never makes a downstream stage stale
        _write_text(out, "params checked by `dwf check-params`\n")
    typer.echo(f"{params}: {len(p.datasets)} datasets, {len(p.runs)} runs, {len(p.experts)} experts, "
               f"{len(p.baselines)} baselines, {len(p.evaluate_models)} evaluated models: all valid")


@app.command()
@stage
def download(dataset: DatasetOpt = "digits", params: ParamsOpt = Path("params.yaml"),
             quiet: QuietOpt = False, dvc: DvcOpt = False):
    """Fetch a dataset into data/NAME as uint8 tensors with a checksummed manifest."""
    from dwf.config import check_name, load_params
    from dwf.data import download as fetch

    if dvc:
        (dataset,) = _dvc_item(params, ("datasets",))
    check_name(dataset, "--dataset")
    root = Path(load_params(params).data_root)
    typer.echo(f"{fetch(dataset, root, progress=not quiet)}")


@app.command("train-expert")
@stage
def train_expert(expert: Annotated[Optional[str], typer.Option(
                     help="expert name, e.g. benign, fgsm_0, pgd_3 (required)")] = None,
                 dataset: DatasetOpt = "digits", run: RunOpt = 0,
                 out: CkptOutOpt = None,
                 history: HistoryOpt = None,
                 params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                 device: DeviceOpt = None, quiet: QuietOpt = False, dvc: DvcOpt = False):
    """Pretrain one expert (Algorithms 1-2) on the training split."""
    from dwf import paths
    from dwf.config import EXPERT_NAME, check_name, expert_kind
    from dwf.data import load_split
    from dwf.defenses.dwf import train_expert as train
    from dwf.runtime import derive_seed

    if dvc:
        dataset, run, expert = _dvc_item(params, ("datasets", "runs", "experts"))
    check_name(_given(expert, "--expert"), "--expert", EXPERT_NAME)
    p, prof, dev = _context(params, dataset, set_, device, data_parallel=True)
    if expert not in p.experts:
        _fail(f"--expert: {expert!r} is not in params experts ({', '.join(p.experts)})")
    out, history = _outputs({"--out": out, "--history": history},
                            [paths.expert(dataset, run, expert), paths.history(dataset, run, expert)],
                            [".pt", ".history.json"], inputs=[params, Path(p.data_root) / dataset],
                            departs={"--set": set_})
    x, y = load_split(dataset, Path(p.data_root), "train")
    curve = train(expert_kind(expert), x, y, cfg=prof.expert, arch_kwargs=_arch(dataset, prof),
                  dataset=dataset, seed=derive_seed(p.seed, run, dataset, "expert", expert),
                  flip=prof.flip, crop_padding=prof.crop_padding, out=out, device=dev,
                  progress=not quiet)
    _finish_training(history, curve, out)


@app.command("train-joint")
@stage
def train_joint(dataset: DatasetOpt = "digits", run: RunOpt = 0,
                experts_dir: Annotated[Optional[Path], typer.Option(help="folder of expert checkpoints")] = None,
                ablation: Annotated[Optional[str], typer.Option(
                    help="train DWF another way, as params' <dataset>.ablations.<name> sets "
                         "(frozen_experts, no_pretraining, fixed_strengths, pgd_experts, "
                         "five_experts); writes dwf_<name>")] = None,
                out: CkptOutOpt = None,
                history: HistoryOpt = None,
                params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                device: DeviceOpt = None, quiet: QuietOpt = False, dvc: DvcOpt = False):
    """Train the mixture end to end on [clean, FGSM, PGD] batches (Algorithm 3)."""
    import os

    from dwf import paths
    from dwf.config import ABLATION_NAMES, choice
    from dwf.data import load_split
    from dwf.defenses.dwf import train_joint as train
    from dwf.runtime import derive_seed

    if dvc and os.environ.get("DVC_STAGE", "").rsplit(":", 1)[-1].startswith("ablation@"):
        dataset, run, ablation = _dvc_item(params, ("datasets", "runs", "ablations"))
    elif dvc:
        dataset, run = _dvc_item(params, ("datasets", "runs"))
    p, prof, dev = _context(params, dataset, set_, device, data_parallel=True)
    name, cfg, mixed, pretrained, train_experts = "dwf", prof.joint, p.experts, True, True
    if ablation is not None:  # its settings on top of the joint phase's (config.train.Ablation)
        choice(ablation, "--ablation", ABLATION_NAMES)
        ab, mixed = p.ablation(dataset, ablation)
        name, cfg = f"dwf_{ablation}", ab.joint(prof.joint)
        pretrained, train_experts = ab.pretrained, ab.train_experts
    folder = experts_dir or paths.expert(dataset, run, "benign").parent
    experts = [folder / f"{e}.pt" for e in mixed]
    out, history = _outputs({"--out": out, "--history": history},
                            [paths.model(dataset, run, name), paths.history(dataset, run, name)],
                            [".pt", ".history.json"],
                            inputs=[params, Path(p.data_root) / dataset, *experts],
                            departs={"--set": set_, "--experts-dir": experts_dir})
    if paths.project_root(out) != Path.cwd():  # kept in the mixture for transfer attacks:
        experts = [e.absolute() for e in experts]  # relative to its project root, or absolute
    x, y = load_split(dataset, Path(p.data_root), "train")
    curve = train(experts, x, y, cfg=cfg, router_hidden=prof.router_hidden, dataset=dataset,
                  seed=derive_seed(p.seed, run, dataset, "joint"), flip=prof.flip,
                  crop_padding=prof.crop_padding, out=out, device=dev, progress=not quiet,
                  pretrained=pretrained, train_experts=train_experts, defense=name)
    _finish_training(history, curve, out)


@app.command()
@stage
def reroute(routing: Annotated[Optional[str], typer.Option(
                help="uniform (no gate) or top1 (the gate's argmax) (required)")] = None,
            dataset: DatasetOpt = "digits", run: RunOpt = 0,
            mixture: Annotated[Optional[Path], typer.Option(help="DWF checkpoint")] = None,
            out: CkptOutOpt = None, params: ParamsOpt = Path("params.yaml"), dvc: DvcOpt = False):
    """Write DWF's trained mixture under another routing decision, for evaluation (ablation:
    are the gate and the soft mixing what makes it robust?)."""
    from dwf import paths
    from dwf.config import ROUTING_NAMES, choice, load_params
    from dwf.defenses.dwf import reroute as write

    if dvc:
        dataset, run, routing = _dvc_item(params, ("datasets", "runs", "routings"))
    choice(_given(routing, "--routing"), "--routing", ROUTING_NAMES)
    p = load_params(params, dataset, [])
    p.profile(dataset)
    source = mixture or paths.model(dataset, run, "dwf")
    (out,) = _outputs({"--out": out}, [paths.model(dataset, run, f"dwf_{routing}")],
                      [f".{routing}.pt"], inputs=[params, source], adhoc=mixture,
                      departs={"--mixture": mixture})
    write(source, routing, dataset=dataset, out=out)
    typer.echo(f"wrote {out}")


@app.command()
@stage
def train(defense: Annotated[Optional[str], typer.Option(
              help=f"baseline (required): {', '.join(DEFENSES)}")] = None,
          dataset: DatasetOpt = "digits", run: RunOpt = 0,
          out: CkptOutOpt = None,
          history: HistoryOpt = None,
          params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
          device: DeviceOpt = None, quiet: QuietOpt = False, dvc: DvcOpt = False):
    """Train one system the paper compares against, with its settings (baselines.NAME)."""
    from dwf import paths
    from dwf.config import check_name
    from dwf.data import load_split
    from dwf.defenses import train_defense
    from dwf.runtime import derive_seed

    if dvc:
        dataset, run, defense = _dvc_item(params, ("datasets", "runs", "baselines"))
    check_name(_given(defense, "--defense"), "--defense")
    p, prof, dev = _context(params, dataset, set_, device, data_parallel=True)
    if defense not in DEFENSES:
        _fail(f"--defense: {defense!r} is not one of {', '.join(DEFENSES)}")
    cfg = prof.baselines.get(defense)
    out, history = _outputs({"--out": out, "--history": history},
                            [paths.model(dataset, run, defense), paths.history(dataset, run, defense)],
                            [".pt", ".history.json"], inputs=[params, Path(p.data_root) / dataset],
                            departs={"--set": set_})
    x, y = load_split(dataset, Path(p.data_root), "train")
    curve = train_defense(defense, x, y, cfg=cfg, arch_kwargs=_arch(dataset, prof), dataset=dataset,
                          seed=derive_seed(p.seed, run, dataset, "defense", defense), flip=prof.flip,
                          crop_padding=prof.crop_padding, out=out, device=dev, progress=not quiet)
    _finish_training(history, curve, out)


@app.command()
@stage
def evaluate(model_name: Annotated[str, typer.Option(
                 "--model", help="dwf, dwf_<routing>, a baseline, or experts/<name>")] = "dwf",
             checkpoint: Annotated[Optional[Path], typer.Option(help="model checkpoint")] = None,
             external: Annotated[Optional[str], typer.Option(
                 help="evaluate a public classifier instead: torchvision name or timm:NAME")] = None,
             weights: Annotated[Optional[Path], typer.Option(help="--external's state dict file")] = None,
             surrogate: Annotated[Optional[list[Path]], typer.Option(
                 help="checkpoint to transfer attacks from, e.g. an undefended ResNet-18")] = None,
             out: Annotated[Optional[Path], typer.Option(help="metrics JSON to write")] = None,
             dataset: DatasetOpt = "digits", run: RunOpt = 0,
             params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
             device: DeviceOpt = None, quiet: QuietOpt = False, workers: WorkersOpt = 0, dvc: DvcOpt = False):
    """Run the paper's attack protocol (Table 4), the stronger attacks, AutoAttack and the audit
    (as params switch on) and write a metrics file (numbers DVC shows) and its details file
    beside it (dwf.metricsfile). Without --out: the pipeline's path, or with --checkpoint, beside
    the checkpoint (X.eval.json). An interrupted run resumes (OUT.resume/)."""
    from dwf import paths
    from dwf.checkpoint import load_model
    from dwf.config import MODEL_NAME, check_name
    from dwf.data import load_split
    from dwf.defenses.external import load_external
    from dwf.evaluate import evaluate as run_protocol
    from dwf.metricsfile import details_path, split
    from dwf.plan import training_cost
    from dwf.runtime import derive_seed
    from dwf.workers import count

    if dvc:
        dataset, run, model_name = _dvc_item(params, ("datasets", "runs", "evaluate_models"))
    check_name(model_name, "--model", MODEL_NAME)
    p, prof, dev = _context(params, dataset, set_, device)
    if external:  # never the metrics of a pipeline model
        if weights is None or checkpoint is not None:
            _fail("--external needs --weights (a state dict file) and no --checkpoint")
        model_name = "external_" + external.replace(":", "_")
    adhoc = checkpoint
    checkpoint = weights if external else checkpoint or paths.model(dataset, run, model_name)
    sources = {}  # transfer attacks are part of the strong suite
    if prof.evaluate.strong:
        sources = _transfer_sources(None if external else checkpoint, surrogate or [])
    elif surrogate:  # asked for, would not run: the metrics would say otherwise than asked
        _fail("--surrogate: transfer attacks belong to the strong suite, which evaluate.strong "
              "= false turns off; drop --surrogate or set evaluate.strong=true")
    inputs = [params, Path(p.data_root) / dataset, checkpoint, *sources.values()]
    (out,) = _outputs({"--out": out}, [paths.evaluation(dataset, run, model_name)], [".eval.json"],
                      inputs=inputs, adhoc=adhoc,
                      departs={"--set": set_, "--checkpoint": adhoc, "--surrogate": surrogate})
    state = out.with_name(out.name + ".resume")  # per-batch results while it runs (git-ignored)
    _refuse_overlap([details_path(out), state], inputs)
    if external:
        arch = _arch(dataset, prof)
        model = load_external(external, weights, num_classes=arch["num_classes"], mean=arch["mean"],
                              std=arch["std"], device=dev, dataset=dataset)
    else:
        model = load_model(checkpoint, dev, dataset=dataset)
    x, y = load_split(dataset, Path(p.data_root), "test")
    metrics = run_protocol(model, x, y, cfg=prof.evaluate, seed=derive_seed(p.seed, run, dataset, "evaluate"),
                           device=dev, progress=not quiet, state=state, workers=count(dev, workers),
                           sources={k: load_model(f, dev, dataset=dataset) for k, f in sources.items()})
    metrics["checkpoint"] = str(checkpoint)
    metrics["params_m"] = round(sum(t.numel() for t in model.parameters()) / 1e6, 4)
    if external:
        metrics["external"] = external
    else:  # what training this system took, counted from params (checked by tests/test_plan.py)
        cost = training_cost(p, dataset, prof, model_name)
        metrics["train_tmacs"] = cost["train_tmacs"]
        metrics["training"] = {"passes": cost["train_passes"], "counted_by": "dwf.plan.training_cost"}
    headline, details = split(metrics)
    _write_json(details_path(out), details)  # first: a headline file always has its details
    _write_json(out, headline)
    shutil.rmtree(state, ignore_errors=True)
    failed = [k for k, c in metrics.get("audit", {}).items() if not c["pass"]]
    typer.echo(f"wrote {out}: clean {metrics['clean']:.2f}%, worst case {metrics['worst_case']:.2f}%"
               + (f"; audit failed: {', '.join(failed)}" if failed else ""))


def _transfer_sources(checkpoint: Optional[Path], surrogates: list[Path]) -> dict[str, Path]:
    """Checkpoints to transfer attacks from: the --surrogate ones and, for a mixture, its
    pretrained experts (the joint stage changed the experts inside it).

    The mixture names its experts relative to its project root (<root>/models/<d>/run<r>/dwf.pt,
    dwf.paths.project_root) or absolutely, so every working directory gets the same attacks;
    each name is checked before any file is opened (paths.listed_expert), and a missing one is
    an error, never a silent skip.
    """
    from dwf import paths
    from dwf.checkpoint import load

    sources = {f"surrogate_{s.stem}": s for s in surrogates}
    listed = load(checkpoint).get("experts", []) if checkpoint is not None else []
    if not isinstance(listed, list):
        raise ValueError(f"{checkpoint}: its experts are not a list of paths")
    named = [paths.listed_expert(e, checkpoint) for e in listed]  # all checked, then opened
    root = paths.project_root(checkpoint) if checkpoint is not None else None
    if any(not e.is_absolute() for e in named) and root is None:
        raise ValueError(f"{checkpoint}: names its experts relative to a project, but lies outside "
                         "<root>/models/<dataset>/run<r>/; evaluate it there")
    sources |= {f"pretrained_{e.stem}": e if e.is_absolute() else root / e for e in named}
    for name, path in sources.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: transfer source {name!r} not found")
    return sources


@app.command()
@stage
def audit(model_name: Annotated[str, typer.Option(
              "--model", help="dwf, dwf_<routing>, a baseline, or experts/<name>")] = "dwf",
          checkpoint: Annotated[Optional[Path], typer.Option(help="model checkpoint")] = None,
          out: Annotated[Optional[Path], typer.Option(help="audit JSON to write")] = None,
          dataset: DatasetOpt = "digits", run: RunOpt = 0,
          params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
          device: DeviceOpt = None, workers: WorkersOpt = 0):
    """Check a model and the attacks for gradient masking and bugs (Carlini et al. 2019)."""
    from dwf import paths
    from dwf.checkpoint import load_model
    from dwf.config import MODEL_NAME, check_name
    from dwf.data import load_split
    from dwf.evaluate import run_audit
    from dwf.runtime import derive_seed
    from dwf.workers import count

    check_name(model_name, "--model", MODEL_NAME)
    p, prof, dev = _context(params, dataset, set_, device)
    checkpoint = checkpoint or paths.model(dataset, run, model_name)
    if out is not None:
        _refuse_overlap([out], [params, Path(p.data_root) / dataset, checkpoint])
        _refuse_pipeline([out], [])
    model = load_model(checkpoint, dev, dataset=dataset)
    x, y = load_split(dataset, Path(p.data_root), "test")
    checks = run_audit(model, x, y, cfg=prof.evaluate, device=dev, workers=count(dev, workers),
                       seed=derive_seed(p.seed, run, dataset, "evaluate"))
    for name, c in checks.items():
        typer.echo(f"{'pass' if c['pass'] else 'FAIL'}  {name}: {json.dumps(c['value'])}")
    if out is not None:
        _write_json(out, {"checkpoint": str(checkpoint), "audit": checks})


@app.command()
@stage
def forensics(undefended: Annotated[str, typer.Option(
                  help="the undefended model the paper's pattern is judged on")] = "experts/benign",
              model_names: Annotated[Optional[list[str]], typer.Option(
                  "--model", help="further models to sweep (repeat; default: dwf)")] = None,
              out: Annotated[Optional[Path], typer.Option(
                  help="JSON to write (default: metrics/forensics/<dataset>/run<run>.json)")] = None,
              steps: Annotated[Optional[list[int]], typer.Option(
                  "--steps", min=1, max=MAX_STEPS,
                  help="PGD-k to report (repeat; default: 10, 20, ..., 100)")] = None,
              dataset: DatasetOpt = "digits", run: RunOpt = 0,
              params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
              device: DeviceOpt = None, quiet: QuietOpt = False, dvc: DvcOpt = False):
    """Protocol forensics (dwf.forensics): PGD-10..100 at the threat model under the correct
    protocol and under each evaluation mistake (none of them a valid evaluation), on the
    pipeline's checkpoints; writes a JSON and prints the comparison page's section."""
    from dwf import paths
    from dwf.checkpoint import load_model
    from dwf.config import MODEL_NAME, check_name
    from dwf.data import load_split, to_unit
    from dwf.forensics import STEPS, compare, section
    from dwf.config.defenses import label
    from dwf.runtime import derive_seed

    if dvc:  # dvc.yaml's forensics: the first run of each dataset
        from dwf.config import load_params

        (dataset,), run = _dvc_item(params, ("datasets",)), load_params(params).runs[0]
    names = [undefended, *(model_names or ["dwf"])]
    for name in names:
        check_name(name, "--model", MODEL_NAME)
    if len(set(names)) < len(names):
        _fail(f"--model: each model once, got {', '.join(names)}")
    p, prof, dev = _context(params, dataset, set_, device)
    cfg = prof.evaluate
    checkpoints = {name: paths.model(dataset, run, name) for name in names}
    out = out or paths.forensics(dataset, run)  # names checked by _context
    _refuse_overlap([out], [params, Path(p.data_root) / dataset, *checkpoints.values()])
    _refuse_pipeline([out], [paths.forensics(dataset, run)], {
        "--set": set_, "--steps": steps, "--model": model_names,
        "--undefended": undefended != "experts/benign"})  # the pipeline's: the defaults
    models = {name: load_model(c, dev, dataset=dataset) for name, c in checkpoints.items()}
    x, y = load_split(dataset, Path(p.data_root), "test")
    n = cfg.examples(len(x))
    say = None if quiet else functools.partial(typer.echo, err=True)
    result = compare(models, to_unit(x[:n]).to(dev), y[:n].to(dev), undefended=undefended,
                     eps=cfg.pgd_eps, alpha=cfg.pgd_alpha, steps=sorted(set(steps or STEPS)),
                     batch_size=cfg.batch_size, seed=derive_seed(p.seed, run, dataset, "forensics"),
                     progress=say)
    result["checkpoints"] = {name: str(c) for name, c in checkpoints.items()}
    # the comparison page's section, rendered here (no torch in report), with its model labels
    result["section"] = section(result, label)
    _write_json(out, result)
    typer.echo(result["section"])
    typer.echo(f"wrote {out}")


@app.command()
@stage
def aggregate(params: ParamsOpt = Path("params.yaml"),
              summary: Annotated[Path, typer.Option(
                  help="summary metrics JSON (the models' rows go beside it, in models/)")
              ] = Path("metrics/summary.json"),
              reports: Annotated[Path, typer.Option(help="reports folder")] = Path("reports")):
    """Mean ± std and 95% interval over runs; Tables 2-3, Figures 6-7, comparison with the paper,
    and the verdict against systems of DWF's training cost and size. The reports folder and the
    summary are replaced together or not at all (report.publish)."""
    from dwf import paths, verdict
    from dwf.config import load_params
    from dwf.metricsfile import details_path
    from dwf.report import aggregate as collect, all_runs, attack_records, load_runs, publish
    from dwf.report import table as render

    p = load_params(params)
    runs = [paths.evaluation(d, r, m) for d in p.datasets for r in p.runs for m in p.evaluate_models]
    _refuse_overlap([summary, reports], [params, *runs, *map(details_path, runs)])
    rows = summary.parent / "models"  # the models' rows, beside the summary (report.publish)
    _refuse_pipeline([summary, reports, rows], [paths.SUMMARY, paths.REPORTS, paths.MODEL_ROWS])
    per_run = load_runs(p.datasets, p.runs, p.evaluate_models)
    result = collect(per_run)  # numbers only; environments: in each run's details file
    found = {d: paths.forensics(d, p.runs[0]) for d in p.datasets}  # dwf forensics, if it ran
    publish(result, per_run, reports, summary, {d: _section(f) for d, f in found.items() if f.is_file()})
    records = attack_records(all_runs(per_run))
    typer.echo(render(result, "table2", records) + "\n" + render(result, "table3", records))
    for d, models in per_run.items():  # the verdict last, where the eye lands
        typer.echo("\n".join(f"{d}: {s}" for s in verdict.sentences(models)))
    typer.echo(f"wrote {summary} and {reports}/ (the verdict: {reports}/verdict.md)")


def _section(path: Path) -> str:
    """The Markdown section a `dwf forensics` JSON carries (one-line error if it has none)."""
    try:
        section = json.loads(path.read_bytes())["section"]
    except (ValueError, KeyError, TypeError):
        section = None
    if not isinstance(section, str):
        _fail(f"{path}: not a dwf forensics file (re-run `dwf forensics`)")
    return section


@app.command()
@stage
def table(metrics: Annotated[list[Path], typer.Argument(help="metrics JSON files")]):
    """Print clean and robust accuracies of metrics files (and their details files) as a
    Markdown table."""
    from dwf.metricsfile import read
    from dwf.report import accuracy_table

    typer.echo(accuracy_table({m.stem: read(m) for m in metrics}))


@app.command()
@stage
def bench(device: DeviceOpt = None,
          width: Annotated[Optional[int], typer.Option(min=1, max=MAX_WIDTH, help="expert width (default: 64 on cuda, 8 on cpu)")] = None,
          batch: Annotated[Optional[int], typer.Option(min=1, max=MAX_BATCH, help="images per view (default: 128 on cuda, 32 on cpu)")] = None,
          pgd_steps: Annotated[Optional[int], typer.Option(min=1, max=MAX_STEPS, help="PGD iterations per timed step")] = None,
          repeats: Annotated[Optional[int], typer.Option(min=1, max=100, help="timed calls per step")] = None,
          precision: Annotated[str, typer.Option(help="optimized path: fp32 or bf16 (autocast)")] = "fp32",
          channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--contiguous", help="optimized path's memory format (default: training's on this device)", show_default=False)] = None,
          batched: Annotated[Optional[bool], typer.Option("--batched/--loop", help="force grouped-conv experts or the loop (default: per device)", show_default=False)] = None,
          reference: Annotated[bool, typer.Option(help="also time the fp32 reference path")] = True,
          deterministic: Annotated[bool, typer.Option(help="deterministic kernels, as training runs; off: cuDNN autotuning")] = True,
          out: Annotated[Path, typer.Option(help="metrics JSON to write")] = Path("metrics/bench.json")):
    """Images/s and FLOP/s of the 9-expert mixture, reference vs optimized; projected hours."""
    import dataclasses

    import torch

    from dwf.bench import DEFAULTS, run, table
    from dwf.config import PRECISIONS
    from dwf.runtime import configure_determinism, memory_format, pick_device

    if precision not in PRECISIONS:
        raise typer.BadParameter(f"choose one of {', '.join(PRECISIONS)}", param_hint="--precision")
    _refuse_pipeline([out], [])
    if deterministic:
        configure_determinism()  # measure what training runs
    else:
        torch.backends.cudnn.benchmark = True  # what determinism costs: autotuned kernels
    dev = pick_device(device)
    sizes = {"width": width, "batch": batch, "pgd_steps": pgd_steps, "repeats": repeats}
    if channels_last is None:
        channels_last = memory_format(dev, precision) == torch.channels_last
    cfg = dataclasses.replace(DEFAULTS.get(dev.type, DEFAULTS["cpu"]), precision=precision,
                              channels_last=channels_last, batched=batched, reference=reference,
                              **{k: v for k, v in sizes.items() if v is not None})
    typer.echo(f"bench on {dev}: 9 experts of width {cfg.width}, batch {cfg.batch} per view, "
               f"PGD-{cfg.pgd_steps}, best of {cfg.repeats}; optimized: {precision}"
               f"{', channels_last' if channels_last else ''}"
               f"{'' if batched is None else ', batched' if batched else ', loop'}"
               f"{'' if deterministic else ', non-deterministic'}")
    result = run(dev, cfg)
    _write_json(out, result)
    peak = result["matmul_flop_per_s"]
    typer.echo(table(result))
    typer.echo("matmul: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items())
               + "; projected paper pipeline (width 64, at these FLOP/s): "
               + ", ".join(f"{k} {h:.0f} h" for k, h in result["projected_hours"].items()))
    typer.echo(f"wrote {out}")


@app.command()
@stage
def plan(params: ParamsOpt = Path("params.yaml"),
         set_: Annotated[Optional[list[str]], typer.Option(
             "--set", help="override a value of every dataset's section, e.g. expert.precision=bf16")] = None,
         rates: Annotated[Optional[Path], typer.Option(
             help="rate table (default: docs/bench/'s for --device, else for the configuration: "
                  "the CPU's for digits, the H200's for the paper's datasets)")] = None,
         device: Annotated[Optional[str], typer.Option(
             "--device", help="price at this machine's rates: cpu or cuda (default: the "
                              "configuration's device, whatever this machine has)")] = None,
         robust: Annotated[float, typer.Option(
             min=0.0, max=1.0, help="assumed share of examples an adversarially trained model "
                                    "keeps: what PGD's later steps and AutoAttack's later "
                                    "attacks still run on")] = 0.55,
         json_out: Annotated[Optional[Path], typer.Option("--json", help="plan JSON to write")] = None):
    """Projected jobs and device-hours of the whole `dvc repro` (training and evaluation), per
    job kind and in total, from measured rates (docs/bench/); says which are extrapolated."""
    from dwf.config import load_params
    from dwf.plan import Assumptions, load_rates, plan as project, reference_device, table as render
    from dwf.runtime import pick_device

    if json_out is not None:
        _refuse_overlap([json_out], [params, *([rates] if rates else [])])
        _refuse_pipeline([json_out], [])
    p = load_params(params)
    profiles = {d: load_params(params, d, set_ or []).profile(d) for d in p.datasets}
    if rates is not None:
        rates_path, table = load_rates(rates, "")
    elif device is None:  # the configuration's own device: the paper's is priced on a GPU
        rates_path, table = load_rates(None, reference_device(p.datasets))
    else:
        import torch

        dev = pick_device(device)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        rates_path, table = load_rates(None, name)
    result = project(p, profiles, table, Assumptions(robust=robust))
    result |= {"params": str(params), "overrides": list(set_ or []), "rates_file": str(rates_path),
               "device": table.get("device")}
    typer.echo(f"dwf plan: {params} ({', '.join(p.datasets)}; {len(p.runs)} runs) priced at "
               f"{table.get('device')} rates ({rates_path}), robust share {robust:g} (undefended: 0)")
    typer.echo(render(result))
    if json_out is not None:
        _write_json(json_out, result)
        typer.echo(f"wrote {json_out}")


def main() -> None:
    """Console entry: like `app()`, but a bad option or argument is one line and exit code 2."""
    try:
        code = app(prog_name="dwf", standalone_mode=False)
    except typer.Abort:
        code = 130
    except Exception as e:  # click's usage errors (bad option, value, command) carry exit code 2
        if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see `dwf {ctx.info_name} --help`)" if ctx is not None and ctx.parent else ""
        typer.echo(f"error: {e.format_message()}{hint}", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)
