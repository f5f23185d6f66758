"""Check the command line's overrides before Hydra runs anything, so that a typo costs one line, not a traceback
or a wasted sweep.

Overrides are parsed with Hydra's own grammar, so every sweep form works (``a,b``, ``choice(...)``,
``range(...)``, ``interval(...)``, ``glob(...)``, ``tag(...)``). Every option of a config group is checked
against the group (a ``glob`` must match at least one); then the config is composed by Hydra for every
combination of the chosen group options -- including the sweeps an experiment file declares -- so keys and
values are checked against the config each job will really have (``experiment=adue_cpu method.lam=50`` is
checked against the AdUE method the experiment selects). Any failure becomes one ``UqloraError`` line.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

from uqlora.errors import UqloraError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MAX_COMBINATIONS = 128  # group combinations composed; beyond that only the first value of the larger sweeps


def _options(conf_dir: Path, group: str) -> list[str]:
    d = conf_dir / group
    names = {p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_")} if d.is_dir() else set()
    if group == "method":
        from uqlora.methods import METHODS, discover

        discover()
        names |= set(METHODS)
    return sorted(names)


def _values(o, valid: list[str] | None) -> list[str]:
    """The values an override takes (a sweep expanded; a glob filtered by ``valid``)."""
    if not o.is_sweep_override():
        return [o.get_value_element_as_str()]
    if o.is_interval_sweep():
        return [str(o.value().start)]
    if type(o.value()).__name__ == "Glob":
        return list(o.value().filter(valid or []))
    return list(o.sweep_string_iterator())


def _one_line(exc: BaseException) -> str:
    """Hydra's / OmegaConf's composition error as one line (the OmegaConf cause names the key and the values)."""
    from omegaconf.errors import OmegaConfBaseException

    err: BaseException | None = exc
    while err is not None:
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            msg = " ".join(str(getattr(err, "msg", "") or err).split("full_key:")[0].split())
            enum = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
            if enum:
                return f"unknown {err.full_key} '{enum.group(1)}'; valid choices: {enum.group(2)}"
            return f"{err.full_key}: {msg}"
        err = err.__cause__ or err.__context__
    return " ".join(str(exc).split()).replace("Error merging override ", "")


class _Composer:
    def __init__(self, conf_dir: Path, config_name: str):
        from hydra import initialize_config_dir

        from uqlora.config import register_configs

        register_configs()
        self.config_name = config_name
        self._ctx = initialize_config_dir(config_dir=str(conf_dir), version_base="1.3")
        self._ctx.__enter__()

    def close(self):
        self._ctx.__exit__(None, None, None)

    def compose(self, overrides: list[str], hydra: bool = False):
        from hydra import compose

        return compose(config_name=self.config_name, overrides=overrides, return_hydra_config=hydra)


def _check_key(cfg, key: str, chosen: dict[str, str]) -> None:
    """An override of a key the composed config does not have: name it and the valid keys of its parent."""
    from omegaconf import DictConfig, OmegaConf

    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return
        if part not in node.keys():
            if not node and i > 0:  # a free-form node (data.options): Hydra asks for a '+' itself
                return
            where = ".".join(parts[:i]) or "the config"
            group = parts[0]
            sel = f" for {group}={chosen[group]}" if group in chosen else ""
            raise UqloraError(f"unknown key '{'.'.join(parts[:i + 1])}'{sel}; valid keys of {where}: "
                              f"{', '.join(sorted(str(k) for k in node))}")
        if OmegaConf.is_missing(node, part):  # a required value (eval.py's run_dir: ???) given on the command line
            return
        node = node[part]


def check_overrides(argv: list[str], config_name: str = "config", conf_dir: Path = CONF_DIR) -> None:
    """Raise :class:`UqloraError` for an unknown config-group option, an unknown key or an invalid value in any
    job the command line (with ``-m``: any job of the sweep) would run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if not (conf_dir / f"{config_name}.yaml").is_file():
        return
    multirun = "-m" in argv or "--multirun" in argv
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args)
    except HydraException as e:
        raise UqloraError(f"cannot parse the overrides: {_one_line(e)}") from None
    groups = {str(p.relative_to(conf_dir)) for p in conf_dir.rglob("*") if p.is_dir()}
    composer = _Composer(conf_dir, config_name)
    try:
        plan = _plan(parsed, groups, conf_dir)
        if multirun:  # an experiment's own sweep (hydra.sweeper.params) adds jobs the command line does not name
            first = [f"{k}={v[0]}" for k, v in plan if v and (k.lstrip("+~") in groups or k.startswith("hydra."))]
            try:
                hcfg = composer.compose(first, hydra=True)
            except Exception as e:  # noqa: BLE001 - reported as one line below
                raise UqloraError(_one_line(e)) from None
            named = {k for k, _ in plan}
            extra = [f"{k}={v}" for k, v in (hcfg.hydra.sweeper.get("params") or {}).items() if k not in named]
            plan += _plan(parser.parse_overrides(extra), groups, conf_dir) if extra else []
        _compose_all(composer, plan, groups)
        if multirun:
            _check_master(composer, plan)
    finally:
        composer.close()


def _check_master(composer: _Composer, plan: list[tuple[str, list[str]]]) -> None:
    """Hydra's multirun first composes one config from the overrides that are not swept (a swept group stays
    at its default): a key that only the swept options have (``method=laplace,tfb method.map_run=...`` with the
    default method ``map``) fails there although every job would compose."""
    master = [k if k.startswith("~") else f"{k}={v[0]}" for k, v in plan if len(v) <= 1 and (v or k.startswith("~"))]
    try:
        composer.compose(master)
    except Exception as e:  # noqa: BLE001
        swept = ", ".join(k for k, v in plan if len(v) > 1)
        raise UqloraError(f"with -m, Hydra first composes the non-swept overrides with the default of each swept "
                          f"group ({swept}) and that fails: {_one_line(e)}; run each option as its own command, or "
                          f"set the key per job in the experiment's sweep") from None


def _plan(parsed, groups: set[str], conf_dir: Path) -> list[tuple[str, list[str]]]:
    """``[(key element, values)]`` of the overrides, group options checked against their group."""
    plan = []
    for o in parsed:
        key = o.key_or_group
        if o.is_delete():
            plan.append((o.get_key_element(), []))
            continue
        valid = _options(conf_dir, key) if key in groups else None
        values = _values(o, valid)
        if valid is not None and not key.startswith("hydra/"):
            for v in values:
                if v not in valid and v not in ("null", ""):
                    raise UqloraError(f"unknown {key} '{v}'; valid choices: {', '.join(valid)}")
            if not values:
                raise UqloraError(f"{o.input_line}: matches no {key} option; valid choices: {', '.join(valid)}")
        plan.append((o.get_key_element(), values))
    return plan


def _compose_all(composer: _Composer, plan: list[tuple[str, list[str]]], groups: set[str]) -> None:
    group_items = [(k, v) for k, v in plan if k.lstrip("+~") in groups and len(v) > 1]
    fixed = [(k, v) for k, v in plan if (k, v) not in group_items]
    combos = list(itertools.islice(itertools.product(*[v for _, v in group_items]), MAX_COMBINATIONS))
    for combo in combos or [()]:
        chosen: dict[str, str] = {}
        overrides = []
        for (k, vals), v in zip(group_items, combo):
            overrides.append(f"{k}={v}")
            chosen[k.lstrip("+~")] = v
        for k, vals in fixed:
            if k.startswith("~"):
                overrides.append(k)
                continue
            overrides.append(f"{k}={vals[0]}")
            if k.lstrip("+~") in groups:
                chosen[k.lstrip("+~")] = vals[0]
        group_only = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in groups]
        try:
            base = composer.compose(group_only)
        except Exception as e:  # noqa: BLE001
            raise UqloraError(_one_line(e)) from None
        for o in overrides:
            key = o.split("=", 1)[0]
            if not key.startswith(("+", "~")) and key not in groups and not key.startswith("hydra."):
                _check_key(base, key, chosen)
        try:
            composer.compose(overrides, hydra=any(o.startswith(("hydra.", "hydra/")) for o in overrides))
        except Exception as e:  # noqa: BLE001
            raise UqloraError(_one_line(e)) from None
