"""Entry-point helpers: check the command line before Hydra runs (:mod:`uqlora.overrides`; ``resume=<dir>``
expanded into that run's overrides), turn :class:`UqloraError` into ``error: <one line>`` with exit code 1,
record a failing sweep member and report the sweep at its end."""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path

import yaml

from uqlora.errors import UqloraError
from uqlora.overrides import check_overrides

log = logging.getLogger(__name__)


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


_FLAGS_WITH_VALUE = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun",
                     "--cfg", "-c", "--package", "-p")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[\w/.\-~:]+", value) else "'" + value.replace("'", "\\'") + "'"


def expand_resume(argv: list[str]) -> list[str]:
    """``resume=<dir>`` -> the run's (or, with ``-m``, the sweep's) saved overrides, then the ones given now
    (which win), the directory as ``hydra.run.dir`` / ``hydra.sweep.dir``, and ``resume=true``."""
    hits = [a for a in argv if a.startswith("resume=")]
    if not hits:
        return argv
    value = hits[-1].split("=", 1)[1]
    if value.lower() in ("true", "false", "null", "none", "0", "1", "yes", "no", ""):
        return argv
    where = Path(value).expanduser()
    multirun = "-m" in argv or "--multirun" in argv
    if multirun:
        src = where / "multirun.yaml"
        if not src.is_file():
            raise UqloraError(f"resume='{value}' is not a sweep directory (no multirun.yaml); with -m give the "
                              "hydra.sweep.dir of the sweep to continue")
        overrides = (yaml.safe_load(src.read_text()) or {}).get("hydra", {}).get("overrides", {})
    else:
        src = where / ".hydra" / "overrides.yaml"
        if not src.is_file():
            hint = " (a sweep: add -m)" if (where / "multirun.yaml").is_file() else ""
            raise UqloraError(f"resume='{value}' is not a run directory (no .hydra/overrides.yaml){hint}")
        hydra_file = where / ".hydra" / "hydra.yaml"
        overrides = {"task": yaml.safe_load(src.read_text()) or [],
                     "hydra": ((yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("overrides", {})
                               .get("hydra", []) if hydra_file.is_file() else [])}
    # the run's own overrides, as typed (no interpolation), and its launcher / sweeper / hydra.* choices
    saved = [str(a) for a in overrides.get("task") or []]
    saved += [str(a) for a in overrides.get("hydra") or []
              if _key(str(a)) not in ("hydra.run.dir", "hydra.sweep.dir", "hydra.mode")]
    flags, given, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            flags.append(a)
            if a in _FLAGS_WITH_VALUE and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        elif not a.startswith("resume="):
            given.append(a)
        i += 1
    added = {_key(a) for a in saved if a.startswith("+") and not a.startswith("++")}
    given = [f"++{a}" if _key(a) in added and not a.startswith(("+", "~")) else a for a in given]
    mine = {_key(a) for a in given}
    kept = [a for a in saved if _key(a) not in mine and _key(a) not in ("resume", "hydra.run.dir", "hydra.sweep.dir")]
    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    out = flags + kept + given + [f"{dir_key}={_quote(str(where))}", "resume=true"]
    log.info("resume: %s", " ".join(out))
    return out


def precheck(config_name: str = "config") -> None:
    try:
        sys.argv[1:] = expand_resume(sys.argv[1:])
        check_overrides(sys.argv[1:], config_name)
    except UqloraError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# --- sweeps: a failing member is recorded and the others go on --------------------------------------------
FAILED_MEMBERS: list[str] = []


def note_member_error(exc: BaseException, run_dir: Path) -> None:
    """A sweep member's error, printed in one line; one that left no ``status: failed`` record (a refusal:
    impossible value, unfinished or differently configured directory) leaves a ``.refused`` marker that
    :class:`SweepReport` reports (it runs in the launching process, whatever the launcher)."""
    from uqlora.io import atomic_write
    from uqlora.rundir import REFUSED_MARKER, RunDir
    from uqlora.runs import one_line

    msg = one_line(exc)
    print(f"error: sweep member failed: {msg}", file=sys.stderr, flush=True)
    res = RunDir(run_dir).results()
    if not (res is not None and res.get("status") == "failed" and res.get("error") == msg):
        atomic_write(Path(run_dir) / REFUSED_MARKER, lambda f: f.write(msg.encode()))


def sweep_summary(sweep_dir: Path) -> dict[str, list]:
    """Members of a sweep folder by state: complete, failed / refused (with their error), unfinished."""
    from uqlora.rundir import COMPLETE, FAILED, REFUSED, RunDir

    out: dict[str, list] = {"complete": [], "failed": [], "refused": [], "unfinished": []}
    for d in sorted(p.parent for p in Path(sweep_dir).glob("*/.hydra")):
        status, why = RunDir(d).status_detail()
        if status == COMPLETE:
            out["complete"].append(d)
        elif status in (FAILED, REFUSED):
            out[status].append((d, why))
        else:
            out["unfinished"].append(d)
    return out


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class SweepReport(_HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): after a multirun, one line per failed, refused or unfinished
    member and a count; ``train.py`` then exits 1 unless every member is complete (every launcher: this runs
    in the launching process)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from uqlora.rundir import REFUSED_MARKER

        sweep_dir = Path(str(config.hydra.sweep.dir))
        s = sweep_summary(sweep_dir)
        for d, err in s["failed"]:
            print(f"failed: {d}: {err}", file=sys.stderr, flush=True)
        for d, err in s["refused"]:
            print(f"refused: {d}: {err}", file=sys.stderr, flush=True)
            (d / REFUSED_MARKER).unlink(missing_ok=True)  # reported once; the directory is as it was
        for d in s["unfinished"]:
            print(f"unfinished (no results.json): {d}", file=sys.stderr, flush=True)
        FAILED_MEMBERS.extend(str(x[0] if isinstance(x, tuple) else x)
                              for k in ("failed", "refused", "unfinished") for x in s[k])
        print(f"sweep {sweep_dir}: {len(s['complete'])} complete, {len(s['failed'])} failed, "
              f"{len(s['refused'])} refused, {len(s['unfinished'])} unfinished", flush=True)
