"""Entry-point helpers: validate command-line overrides before Hydra composes (so a typo costs one
line, not a traceback), and turn :class:`UqloraError` into ``error: <one line>`` with exit code 1."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import yaml

from uqlora.errors import UqloraError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
log = logging.getLogger(__name__)


def _split_values(value: str) -> list[str]:
    """Hydra sweep syntax ``a,b`` -> [a, b]; values with brackets/functions are left whole."""
    if any(c in value for c in "[]()"):
        return [value]
    return [v.strip() for v in value.split(",") if v.strip()]


def _options(conf_dir: Path, group: str) -> list[str]:
    d = conf_dir / group
    names = {p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_")} if d.is_dir() else set()
    if group == "method":
        from uqlora.methods import METHODS, discover

        discover()
        names |= set(METHODS)
    return sorted(names)


def _defaults(conf_dir: Path, config_name: str) -> dict[str, str]:
    cfg = yaml.safe_load((conf_dir / f"{config_name}.yaml").read_text()) or {}
    out = {}
    for item in cfg.get("defaults", []):
        if isinstance(item, dict):
            for k, v in item.items():
                out[k.replace("override ", "").strip()] = v
    return out


def _keys(conf_dir: Path, group: str, option: str) -> dict | None:
    path = conf_dir / group / f"{option}.yaml"
    if not path.is_file():
        return None
    node = yaml.safe_load(path.read_text()) or {}
    for parent in node.pop("defaults", None) or []:  # same-group parents such as _base
        if isinstance(parent, str) and parent != "_self_" and (conf_dir / group / f"{parent}.yaml").is_file():
            node = {**(_keys(conf_dir, group, parent) or {}), **node}
    if group == "method":
        from uqlora.methods import SCHEMAS
        import dataclasses

        if option in SCHEMAS:
            node = {**{f.name: None for f in dataclasses.fields(SCHEMAS[option])}, **node}
    return node


def check_overrides(argv: list[str], config_name: str = "config", conf_dir: Path = CONF_DIR) -> None:
    """Raise UqloraError for an unknown config-group option or an unknown key of a group."""
    if not (conf_dir / f"{config_name}.yaml").is_file():
        return
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    chosen = _defaults(conf_dir, config_name)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    for arg in overrides:
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in groups and value not in ("null", ""):
            valid = _options(conf_dir, key)
            for v in _split_values(value):
                if v not in valid:
                    raise UqloraError(f"unknown {key} '{v}'; valid choices: {', '.join(valid)}")
            chosen[key] = _split_values(value)[0]
    for arg in overrides:
        key = arg.split("=", 1)[0]
        if key.startswith(("+", "~")) or "." not in key:
            continue
        group, *path = key.split(".")
        if group not in groups or group in ("hydra", "experiment", "debug") or not chosen.get(group):
            continue
        node = _keys(conf_dir, group, str(chosen[group]))
        for i, part in enumerate(path):
            if not isinstance(node, dict) or not node:  # free-form node (e.g. data.options): anything goes
                break
            if part not in node:
                where = ".".join([group, *path[:i]])
                raise UqloraError(f"unknown key '{'.'.join([group, *path[: i + 1]])}' for {group}={chosen[group]}; "
                                  f"valid keys of {where}: {', '.join(sorted(node))}")
            node = node[part]


@contextlib.contextmanager
def guard():
    """Print a UqloraError as one line and exit 1; always close the W&B run."""
    from uqlora.logging_utils import finish

    try:
        yield
    except UqloraError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        finish()
        sys.exit(1)
    finally:
        finish()


def precheck(config_name: str = "config") -> None:
    try:
        check_overrides(sys.argv[1:], config_name)
    except UqloraError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
