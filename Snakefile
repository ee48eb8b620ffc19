# The same pipeline as dvc.yaml, for clusters: every expert training is an independent job.
#   snakemake -n                                   # dry run: list every job
#   snakemake --workflow-profile profiles/slurm    # submit to SLURM (GPU jobs as resources)
#   snakemake --config joint_gpus=4 ...            # joint training over 4 GPUs (torchrun, DDP)
# Outputs land at the paths dvc.yaml declares; record them with `dvc commit` (README).

configfile: "params.yaml"


# The image the README builds from ./Dockerfile; used with --software-deployment-method apptainer.
container: "docker://dwf:0.1.0"

DATASETS = config["datasets"]
RUNS = config["runs"]
EXPERTS = config["experts"]
BASELINES = config.get("baselines", [])
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
    model="[a-z0-9_]+(/[a-z0-9_]+)?",


rule all:
    input:
        "metrics/summary.json",


rule download:
    output:
        directory("data/{dataset}"),
    log:
        "logs/download/{dataset}.log",
    shell:
        "dwf download --dataset {wildcards.dataset} > {log} 2>&1"


rule expert:
    input:
        "data/{dataset}",
    output:
        "models/{dataset}/run{run}/experts/{expert}.pt",
        "metrics/runs/{dataset}/run{run}/train/{expert}.json",
    log:
        "logs/expert/{dataset}/run{run}/{expert}.log",
    resources:
        gpu=1,
    shell:
        "dwf train-expert --dataset {wildcards.dataset} --run {wildcards.run}"
        " --expert {wildcards.expert} --quiet > {log} 2>&1"


rule joint:
    input:
        "data/{dataset}",
        expand("models/{{dataset}}/run{{run}}/experts/{expert}.pt", expert=EXPERTS),
    output:
        "models/{dataset}/run{run}/dwf.pt",
        "metrics/runs/{dataset}/run{run}/train/dwf.json",
    log:
        "logs/joint/{dataset}/run{run}.log",
    resources:
        gpu=JOINT_GPUS,
    params:
        launch=JOINT_LAUNCH,
    shell:
        "{params.launch} train-joint --dataset {wildcards.dataset} --run {wildcards.run} --quiet > {log} 2>&1"


rule baseline:
    input:
        "data/{dataset}",
    output:
        "models/{dataset}/run{run}/{defense}.pt",
        "metrics/runs/{dataset}/run{run}/train/{defense}.json",
    log:
        "logs/baseline/{dataset}/run{run}/{defense}.log",
    resources:
        gpu=1,
    shell:
        "dwf train --defense {wildcards.defense} --dataset {wildcards.dataset}"
        " --run {wildcards.run} --quiet > {log} 2>&1"


rule evaluate:
    input:
        "data/{dataset}",
        "models/{dataset}/run{run}/{model}.pt",
    output:
        "metrics/runs/{dataset}/run{run}/eval/{model}.json",
    log:
        "logs/evaluate/{dataset}/run{run}/{model}.log",
    resources:
        gpu=1,
    shell:
        "dwf evaluate --dataset {wildcards.dataset} --run {wildcards.run}"
        " --model {wildcards.model} --quiet > {log} 2>&1"


rule aggregate:
    input:
        expand(
            "metrics/runs/{dataset}/run{run}/eval/{model}.json",
            dataset=DATASETS,
            run=RUNS,
            model=MODELS,
        ),
    output:
        "metrics/summary.json",
        directory("reports"),
    log:
        "logs/aggregate.log",
    shell:
        "dwf aggregate > {log} 2>&1"
