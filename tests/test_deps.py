"""DVC code deps that cannot drift (issue 11 item 8, issue 15).

Each dvc.yaml stage runs one `dwf` command. The import statements reachable from that command
(its function in cli.py, the cli helpers it calls, then every import anywhere in each project
module reached) give the project files whose change can change the stage's result; the stage's
`deps` must cover each (a folder dep covers its files). Deps beyond that are allowed.
The Snakefile declares no code inputs (Snakemake goes by file times), so there is nothing there
to compare.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CLI = SRC / "dwf" / "cli.py"

# A stage parses the whole params file, so it imports the validation of sections it never
# reads; those modules cannot change its results and stay out of its deps, so that, as the
# config split intends, an evaluation-only change retrains nothing, a training-only one
# re-evaluates nothing, and neither downloads the data again.
# The registry of baselines (config/defenses.py) is read by the stages that validate, train or
# label baselines (check_params, baseline, aggregate); a new row retrains and re-evaluates
# nothing else.
REGISTRY = "src/dwf/config/defenses.py"
SECTIONS = {"src/dwf/config/train.py", "src/dwf/config/evaluate.py"}
NOT_READ = {
    "download": SECTIONS | {REGISTRY},
    "expert": {"src/dwf/config/evaluate.py", REGISTRY},
    "joint": {"src/dwf/config/evaluate.py", REGISTRY},
    "ablation": {"src/dwf/config/evaluate.py", REGISTRY},
    "baseline": {"src/dwf/config/evaluate.py"},
    "evaluate": {"src/dwf/config/train.py", REGISTRY},
    "forensics": {"src/dwf/config/train.py", REGISTRY},
    "aggregate": SECTIONS,
}


def _module_file(name: str) -> Path | None:
    """src/dwf/a/b.py or src/dwf/a/b/__init__.py for 'dwf.a.b'; None outside the project."""
    base = SRC.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(node: ast.AST, module: str) -> set[str]:
    """Project modules named by every import statement inside `node` (of module `module`)."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative: from the module's package, one level up per extra dot
                package = module if _module_file(module).name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(n.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            found.add(base)
            found |= {f"{base}.{a.name}" for a in n.names}  # `from pkg import submodule`
    return {m for m in found if m.split(".")[0] == "dwf" and _module_file(m) is not None}


def _with_packages(module: str) -> set[str]:
    """A module and every package above it (importing dwf.a.b runs dwf/__init__ and dwf/a/__init__)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imported_files(command: str) -> set[str]:
    """Project files (relative to the repository) that running `dwf COMMAND` can import."""
    tree = ast.parse(CLI.read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    root = next((f for f in functions.values() if _command_name(f) == command), None)
    assert root is not None, f"no `dwf {command}` command in cli.py"
    reached, todo = set(), [root, functions["main"]]  # main: the console entry point
    while todo:
        fn = todo.pop()
        if fn.name in reached:
            continue
        reached.add(fn.name)
        todo += [functions[n.id] for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in functions]
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = set().union(*(_imports(n, "dwf.cli") for n in top + [functions[f] for f in reached]))
    seen, todo = {"dwf.cli", "dwf"}, sorted(modules)
    while todo:  # every import anywhere in a reached module: a lazy import may run too
        for m in _with_packages(todo.pop()) - seen:
            seen.add(m)
            todo += sorted(_imports(ast.parse(_module_file(m).read_text()), m))
    return {str(_module_file(m).relative_to(ROOT)) for m in seen}


def _command_name(fn: ast.FunctionDef) -> str | None:
    """The `dwf` command name of a function decorated with @app.command(...)."""
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "command":
            if d.args and isinstance(d.args[0], ast.Constant):
                return d.args[0].value
            return fn.name.replace("_", "-")
    return None


def _stages() -> dict:
    """dvc.yaml's stages, a foreach stage by its `do` body."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def missing_deps(stage: str, spec: dict) -> set[str]:
    """Files the stage's command imports that its deps do not cover."""
    command = re.search(r"\bdwf\s+([a-z][a-z-]*)", spec["cmd"]).group(1)
    deps = [d for d in spec.get("deps", []) if isinstance(d, str)]
    return {f for f in imported_files(command) - NOT_READ.get(stage, set()) if not _covered(f, deps)}


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_cover_every_imported_project_file(stage):
    missing = missing_deps(stage, _stages()[stage])
    assert not missing, f"dvc.yaml stage {stage!r} imports but does not depend on {sorted(missing)}"


@pytest.mark.parametrize("stage", ["expert", "joint", "baseline", "evaluate"])
def test_computing_stages_track_the_cpu_thread_count(stage):
    assert "cpu_threads" in _stages()[stage]["params"]  # CPU results depend on it (issue 15)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_code_deps_exist(stage):
    code = [d for d in _stages()[stage].get("deps", []) if d.startswith("src/")]
    assert code and all((ROOT / d).exists() for d in code), code


def test_a_removed_dep_is_caught():
    """The check itself: drop a file or a folder from a stage and it reports what is missing."""
    spec = _stages()["expert"]
    for dropped, file in [("src/dwf/cli.py", "src/dwf/cli.py"), ("src/dwf/paths.py", "src/dwf/paths.py"),
                          ("src/dwf/fileio.py", "src/dwf/fileio.py"),
                          ("src/dwf/models", "src/dwf/models/moe.py")]:
        without = {**spec, "deps": [d for d in spec["deps"] if d != dropped]}
        assert file in missing_deps("expert", without), dropped


def test_imports_are_followed_through_lazy_imports_and_packages():
    files = imported_files("evaluate")
    assert {"src/dwf/__init__.py", "src/dwf/cli.py", "src/dwf/paths.py", "src/dwf/adaptive.py",
            "src/dwf/models/resnet.py"} <= files
    assert "src/dwf/report.py" not in files and "src/dwf/bench.py" not in files  # other commands'
    assert "src/dwf/checkpoint.py" not in imported_files("download")


# The joint stage reads one checkpoint per name in params.yaml's `experts`, and the mixture's
# evaluation attacks from the same files (transfer sources). DVC cannot expand a list param into
# deps (3.67: "Cannot interpolate data of type 'list'"), so dvc.yaml names them by index,
# ${experts[0]} ... ${experts[8]}: a shorter list fails to parse, a renamed expert is followed.
EXPERT_DEP = re.compile(r"models/\$\{item\.dataset\}/run\$\{item\.run\}/experts/\$\{experts\[(\d+)\]\}\.pt")


@pytest.mark.parametrize("stage", ["joint", "evaluate"])
def test_every_expert_checkpoint_is_a_dep_file_by_file(stage):
    experts = yaml.safe_load((ROOT / "params.yaml").read_text())["experts"]
    deps = _stages()[stage]["deps"]
    indices = [int(m.group(1)) for d in deps if (m := EXPERT_DEP.fullmatch(d))]
    assert indices == list(range(len(experts))), (indices, experts)
    assert not any(d.rstrip("/").endswith("/experts") for d in deps)  # not the folder
