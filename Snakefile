# The same pipeline as dvc.yaml, for clusters: every expert training is an independent job.
#   snakemake -n                                   # dry run: list every job
#   snakemake --workflow-profile profiles/slurm    # submit to SLURM (GPU jobs as resources)
#   snakemake --config joint_gpus=4 ...            # joint training over 4 GPUs (torchrun, DDP)
#   cd studies/digits && snakemake -s ../../Snakefile --cores 2   # a study: its folder, its params
# Outputs land at the paths dvc.yaml declares; record them with `dvc commit -f dvc.yaml` (no
# prompt). Snakemake judges by file times, which `dvc pull` leaves in no particular order: after
# a pull, `snakemake --touch` once marks the restored files up to date (docs/usage.md).

import re
import sys
from pathlib import Path

import yaml

configfile: "params.yaml"

# The dwf commands read params.yaml, not Snakemake's config: a --config (or --configfile) value
# that differs from the file would change this job graph but not what the jobs compute.
# Refused in one line; joint_gpus, how a job is launched, is the only Snakemake setting.
with open("params.yaml") as f:
    _PARAMS = yaml.safe_load(f)
_DIFFERS = sorted(k for k in config if k != "joint_gpus" and config[k] != _PARAMS.get(k))
if _DIFFERS:
    sys.exit(f"error: --config {', '.join(map(str, _DIFFERS))}: the dwf commands read params.yaml; "
             "change it there (only joint_gpus may be set with --config)")


# One truth about staleness (issue 24): each rule depends on what the DVC stage of its name
# declares in dvc.yaml, read from there (one source). Its code: every file DVC hashes (a folder
# stands for the files in it). Its params: their values are written to a small file per job
# kind under .dwf/snakemake/, rewritten only when a value changes, so a changed value makes
# that file newer than the outputs. Snakemake's file times then plan exactly the jobs whose
# DVC stage `dvc status` calls stale, and what depends on them (as `dvc repro` reruns them).
with open("dvc.yaml") as f:
    _STAGES = yaml.safe_load(f)["stages"]


def _stage(name):
    return _STAGES[name].get("do", _STAGES[name])  # a foreach stage's body is under `do`


def _item(text, item):
    """dvc.yaml's ${item.NAME} (or a plain list's ${item}) with this job's wildcards."""
    return re.sub(r"\$\{item(?:\.(\w+))?\}", lambda m: str(item[m.group(1) or "dataset"]), text)


def code_files(stage):
    """The source files DVC hashes for `stage`; data, checkpoints and the params marker are
    the rules' other inputs."""
    files = []
    for dep in _stage(stage)["deps"]:
        if "src/dwf" not in dep:
            continue
        path = Path(dep)
        files += [dep] if not path.is_dir() else sorted(
            str(p) for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def params_file(stage, *names):
    """An input function: the file holding the values of `stage`'s DVC params for a job."""
    def values_file(wildcards):
        item = {n: wildcards[n] for n in names}
        values = {}
        for key in (_item(k, item) for k in _stage(stage).get("params", [])):
            value = _PARAMS
            for part in key.split("."):  # DVC's dotted keys: a section stands for all of it
                value = value[part]
            values[key] = value
        path = Path(".dwf/snakemake", "-".join([stage, *item.values()]) + ".yaml")
        text = yaml.safe_dump(values, sort_keys=True)
        if not path.is_file() or path.read_text() != text:  # same values, same file time
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return str(path)
    return values_file


# The image the README builds from ./Dockerfile; used with --software-deployment-method apptainer.
container: "docker://dwf:0.1.0"

DATASETS = config["datasets"]
RUNS = config["runs"]
EXPERTS = config["experts"]
BASELINES = config.get("baselines", [])
ROUTINGS = config.get("routings", [])  # DWF's mixture under other routing decisions (dwf reroute)
ABLATIONS = config.get("ablations", [])  # DWF trained another way (dwf train-joint --ablation)
MODELS = config["evaluate_models"]
# GPUs of one joint-training job; above 1 it runs under torchrun (DDP, dwf.distributed), and
# the joint batch size must divide evenly over them
JOINT_GPUS = int(config.get("joint_gpus", 1))
JOINT_LAUNCH = f"torchrun --standalone --nproc_per_node={JOINT_GPUS} -m dwf" if JOINT_GPUS > 1 else "dwf"

wildcard_constraints:
    dataset="[a-z0-9]+",
    run=r"\d+",
    expert="[a-z]+(_[0-9]+)?",
    defense="|".join(BASELINES) or "^$",
    routing="|".join(ROUTINGS) or "^$",
    ablation="|".join(ABLATIONS) or "^$",
    model="[a-z0-9_]+(/[a-z0-9_]+)?",


rule all:
    input:
        "metrics/summary.json",
        # as `dvc repro`: the rerouted and ablated mixtures too, evaluated or not
        expand("models/{dataset}/run{run}/dwf_{routing}.pt", dataset=DATASETS, run=RUNS,
               routing=ROUTINGS),
        expand("models/{dataset}/run{run}/dwf_{ablation}.pt", dataset=DATASETS, run=RUNS,
               ablation=ABLATIONS),


# `make ablations`: issue 22's rows alone: DWF rerouted or trained another way, and DWF's own
# experts evaluated one by one (its best single expert), with what they need
rule ablations:
    input:
        expand("metrics/runs/{dataset}/run{run}/eval/{model}.json", dataset=DATASETS, run=RUNS,
               model=[m for m in MODELS if m.startswith("dwf_")
                      or (m.startswith("experts/") and m != "experts/benign")]),


# A directory() output gets Snakemake's .snakemake_timestamp inside, and data/{dataset} and
# reports/ are DVC outputs: each rule declares the file written last instead (the manifest
# says a dataset is complete; reports/ is written before metrics/summary.json).
rule download:
    input:
        code_files("download"),
        params_file("download", "dataset"),
    output:
        "data/{dataset}/manifest.json",
    log:
        "logs/download/{dataset}.log",
    shell:
        "dwf download --dataset {wildcards.dataset:q} > {log:q} 2>&1"


rule expert:
    input:
        "data/{dataset}/manifest.json",
        code_files("expert"),
        params_file("expert", "dataset"),
    output:
        "models/{dataset}/run{run}/experts/{expert}.pt",
        "metrics/runs/{dataset}/run{run}/train/{expert}.json",
    log:
        "logs/expert/{dataset}/run{run}/{expert}.log",
    # the experts and the joint training are the longest chain (DWF's evaluation waits on it)
    priority: 2
    resources:
        gpu=1,
    shell:
        "dwf train-expert --dataset {wildcards.dataset:q} --run {wildcards.run:q}"
        " --expert {wildcards.expert:q} --quiet > {log:q} 2>&1"


rule joint:
    input:
        "data/{dataset}/manifest.json",
        expand("models/{{dataset}}/run{{run}}/experts/{expert}.pt", expert=EXPERTS),
        code_files("joint"),
        params_file("joint", "dataset"),
    output:
        "models/{dataset}/run{run}/dwf.pt",
        "metrics/runs/{dataset}/run{run}/train/dwf.json",
    log:
        "logs/joint/{dataset}/run{run}.log",
    priority: 3
    resources:
        gpu=JOINT_GPUS,
    params:
        launch=JOINT_LAUNCH,
    shell:
        "{params.launch} train-joint --dataset {wildcards.dataset:q} --run {wildcards.run:q}"
        " --quiet > {log:q} 2>&1"


# Ablations (b), (c): DWF trained another way (<dataset>.ablations), on the same experts
rule ablation:
    input:
        "data/{dataset}/manifest.json",
        expand("models/{{dataset}}/run{{run}}/experts/{expert}.pt", expert=EXPERTS),
        code_files("ablation"),
        params_file("ablation", "dataset", "ablation"),
    output:
        "models/{dataset}/run{run}/dwf_{ablation}.pt",
        "metrics/runs/{dataset}/run{run}/train/dwf_{ablation}.json",
    log:
        "logs/ablation/{dataset}/run{run}/{ablation}.log",
    resources:
        gpu=JOINT_GPUS,
    params:
        launch=JOINT_LAUNCH,
    shell:
        "{params.launch} train-joint --ablation {wildcards.ablation:q} --dataset {wildcards.dataset:q}"
        " --run {wildcards.run:q} --quiet > {log:q} 2>&1"


# Ablation (a): DWF's trained mixture under another routing decision, no training
rule reroute:
    input:
        "models/{dataset}/run{run}/dwf.pt",
        code_files("reroute"),
    output:
        "models/{dataset}/run{run}/dwf_{routing}.pt",
    log:
        "logs/reroute/{dataset}/run{run}/{routing}.log",
    shell:
        "dwf reroute --routing {wildcards.routing:q} --dataset {wildcards.dataset:q}"
        " --run {wildcards.run:q} > {log:q} 2>&1"


rule baseline:
    input:
        "data/{dataset}/manifest.json",
        code_files("baseline"),
        params_file("baseline", "dataset", "defense"),
    output:
        "models/{dataset}/run{run}/{defense}.pt",
        "metrics/runs/{dataset}/run{run}/train/{defense}.json",
    log:
        "logs/baseline/{dataset}/run{run}/{defense}.log",
    resources:
        gpu=1,
    shell:
        "dwf train --defense {wildcards.defense:q} --dataset {wildcards.dataset:q}"
        " --run {wildcards.run:q} --quiet > {log:q} 2>&1"


rule evaluate:
    input:
        "data/{dataset}/manifest.json",
        "models/{dataset}/run{run}/{model}.pt",
        # the mixture transfers attacks from its pretrained experts (as in dvc.yaml)
        expand("models/{{dataset}}/run{{run}}/experts/{expert}.pt", expert=EXPERTS),
        code_files("evaluate"),
        params_file("evaluate", "dataset"),
    output:
        "metrics/runs/{dataset}/run{run}/eval/{model}.json",
        "metrics/runs/{dataset}/run{run}/eval/{model}.details.json",
    log:
        "logs/evaluate/{dataset}/run{run}/{model}.log",
    # its independent attacks run in {threads} processes (dwf.workers; the results do not depend
    # on the number): scaled down to --cores on one machine, one process on a GPU
    threads: 8
    # above the baselines' trainings: DWF's evaluations, the longest jobs, start as soon as
    # the mixture is trained, and short jobs fill the end
    priority: 1
    resources:
        gpu=1,
    shell:
        "dwf evaluate --dataset {wildcards.dataset:q} --run {wildcards.run:q}"
        " --model {wildcards.model:q} --workers {threads} --quiet > {log:q} 2>&1"


# Protocol forensics on the first run (dvc.yaml's forensics stage); the comparison page prints it
rule forensics:
    input:
        "data/{dataset}/manifest.json",
        "models/{dataset}/run{run}/dwf.pt",
        "models/{dataset}/run{run}/experts/benign.pt",
        code_files("forensics"),
        params_file("forensics", "dataset"),
    output:
        "metrics/forensics/{dataset}/run{run}.json",
    log:
        "logs/forensics/{dataset}/run{run}.log",
    resources:
        gpu=1,
    shell:
        "dwf forensics --dataset {wildcards.dataset:q} --run {wildcards.run:q} --quiet > {log:q} 2>&1"


rule aggregate:
    input:
        expand(
            "metrics/runs/{dataset}/run{run}/eval/{model}.json",
            dataset=DATASETS,
            run=RUNS,
            model=MODELS,
        ),
        expand("metrics/forensics/{dataset}/run{run}.json", dataset=DATASETS, run=RUNS[:1]),
        code_files("aggregate"),
        params_file("aggregate"),
    output:
        "metrics/summary.json",
    log:
        "logs/aggregate.log",
    shell:
        "dwf aggregate > {log:q} 2>&1"


# A GPU request that no node of its SLURM partition can meet would wait in the queue forever
# (issue 26): before anything is submitted, each partition that a job asking for a GPU names
# must have GPU GRES in `sinfo`. (onstart runs after the job graph is built, not in dry runs.)
def _refuse_gpus_the_cluster_lacks():
    import subprocess

    from snakemake.exceptions import WorkflowError

    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return
    wanting = {}  # partition -> rules whose jobs ask for a GPU there
    for job in workflow.dag.needrun_jobs():
        if int(job.resources.get("gpu", 0) or 0) > 0:
            partition = job.resources.get("slurm_partition") or ""
            wanting.setdefault(partition, set()).add(job.rule.name)
    for partition, rules in sorted(wanting.items()):
        cmd = ["sinfo", "--noheader", "--format=%G"] + ([f"--partition={partition}"] if partition else [])
        gres = subprocess.run(cmd, capture_output=True, text=True).stdout
        if "gpu" not in gres:
            where = f"partition {partition!r}" if partition else "this cluster"
            raise WorkflowError(
                f"rules {', '.join(sorted(rules))} ask for a GPU, and no node of {where} has one "
                f"(sinfo GRES: {' '.join(gres.split()) or 'none'}); use a GPU partition, or set "
                "their gpu resource to 0 in the profile (profiles/slurm-local)")


onstart:
    _refuse_gpus_the_cluster_lacks()
