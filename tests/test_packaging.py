"""Dependencies are declared exactly as the code imports them, and environment.yml is pyproject.toml's list."""
import ast
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DIST = {"yaml": "pyyaml", "sklearn": "scikit-learn", "lightning": "lightning", "hydra": "hydra-core"}
# declared, used without an import of their own: Hydra plugins selected by config (hydra/launcher=joblib|slurm,
# hparams_search=...), the SQL stack the Optuna sweeper's storage needs, and the file formats transformers reads
# and writes (GGUF conversion of the packaged SmolLM2; safetensors)
USED_WITHOUT_IMPORT = {"hydra-joblib-launcher", "hydra-submitit-launcher", "hydra-optuna-sweeper", "sqlalchemy",
                       "alembic", "gguf", "safetensors"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_top_level() -> set[str]:
    out = set()
    files = list((ROOT / "src" / "uqlora").rglob("*.py")) + [ROOT / "train.py", ROOT / "eval.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.add(node.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and m not in ("uqlora", "__future__")}


def test_runtime_dependencies_are_exactly_the_imported_ones():
    declared = {_name(r) for r in _pyproject()["dependencies"]}
    imported = {DIST.get(m, m).lower() for m in _imported_top_level()}
    assert imported - declared == set(), f"imported but not declared in pyproject.toml: {sorted(imported - declared)}"
    unused = declared - imported - USED_WITHOUT_IMPORT
    assert unused == set(), f"declared but never imported (remove, or say why in USED_WITHOUT_IMPORT): {sorted(unused)}"


def test_environment_yml_lists_pyprojects_dependencies():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    project = _pyproject()
    wanted = {_name(r): r.replace(" ", "") for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    assert set(listed) == set(wanted), f"environment.yml vs pyproject.toml: {sorted(set(listed) ^ set(wanted))}"
    for name, spec in wanted.items():
        if name != "torch":  # environment.yml pins the CPU build the measured numbers used
            assert listed[name] == spec, f"{name}: environment.yml '{listed[name]}' vs pyproject.toml '{spec}'"
    assert "-e ." in pip
