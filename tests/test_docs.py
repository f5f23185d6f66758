"""The README and the docs/ pages stay true of the code: every `python train.py` / `python eval.py` command in them
(code blocks and inline code) composes the way `--cfg job` would compose it -- `resume=<dir>` expanded, every
group option, key and value checked and, with `-m`, every job of the sweep composed (uqlora.overrides), a single
run's config composed and its values validated; every `make` target they name exists; every script they run and
every repository path they name exists; every relative link between the pages resolves (anchors included); every
docs page is linked from the README, and the README stays short. Composition only: nothing trains."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import CONF, ROOT, compose

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220
SCRIPTS = {"train.py": "config", "eval.py": "eval"}
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>]*>")
FENCE = re.compile(r"^\s*```")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"^(?:src|conf|tests|experiments|benchmarks|notebooks|docs)/[\w./-]*$")
PKG_PATH = re.compile(r"^(?:core|methods|data|models|metrics|callbacks)/[\w./-]*$")
GROUPS = {str(p.relative_to(CONF)) for p in CONF.rglob("*") if p.is_dir()}


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_and_prose(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(line number, line) of the lines inside fenced code blocks, and of the other lines."""
    fenced, prose, inside = [], [], False
    for i, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        (fenced if inside else prose).append((i, line))
    return fenced, prose


def commands(page: Path) -> list[Command]:
    """Shell commands (`python ...`, `make ...`) of a page: whole lines of code blocks (with `\\` continuations)
    and inline code spans, which may wrap across lines of prose."""
    fenced, prose = fenced_and_prose(page.read_text())
    out, pending, start = [], "", 0
    for i, line in fenced:
        if pending:
            line = pending + " " + line.strip()
        else:
            start = i
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
            continue
        pending = ""
        text = line.strip()
        if text.startswith(("python ", "make ")) or text == "make":
            out.append(Command(rel(page), start, text))
    joined = "\n".join(line for _, line in prose)
    numbers = [i for i, _ in prose]
    for m in INLINE.finditer(joined):
        text = " ".join(m.group(1).split())
        if text.startswith(("python ", "make ")):
            out.append(Command(rel(page), numbers[joined.count("\n", 0, m.start())], text))
    return out


def strip_comment(text: str) -> str:
    return re.split(r"\s#\s", " " + text + " ", maxsplit=1)[0].strip()


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A directory that `resume=<dir>` accepts as a run (and, with -m, as a sweep): no overrides of its own."""
    d = tmp_path_factory.mktemp("docs_run")
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text("[]\n")
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"hydra": [], "task": []}}}))
    (d / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"hydra": [], "task": []}}}))
    return d


def substitute(argv: list[str], dummy: Path) -> list[str] | None:
    """Placeholders (`<run dir>`) replaced by a path that exists; None when one stands for a config-group option
    (`model=<m>`), which no path can replace."""
    out = []
    for a in argv:
        if PLACEHOLDER.search(a):
            key = a.split("=", 1)[0].lstrip("+~") if "=" in a else None
            if key in GROUPS:
                return None
            a = PLACEHOLDER.sub(str(dummy), a)
        out.append(a)
    return out


ALL = [c for page in PAGES for c in commands(page)]
PY = [c for c in ALL if c.text.split()[1] in SCRIPTS]
MAKE = [c for c in ALL if c.text.split()[0] == "make"]
OTHER_PY = [c for c in ALL if c.text.startswith("python ") and c not in PY]


def test_the_docs_have_commands():
    assert len(PY) >= 40 and any("eval.py" in c.text for c in PY) and any(" -m " in c.text for c in PY)
    assert {"README.md"} <= {c.page for c in PY}


_CHECKED: dict[tuple[str, ...], str | None] = {}  # the same command on several pages is composed once


def compose_error(argv: list[str], config_name: str) -> str | None:
    """None when the command composes as `--cfg job` would compose it, else the one-line reason."""
    from uqlora.cli import expand_resume
    from uqlora.errors import UqloraError
    from uqlora.overrides import check_overrides
    from uqlora.validate import validate_config

    try:
        argv = expand_resume(argv)
        check_overrides(argv, config_name)
        if "-m" in argv or "--multirun" in argv:
            return None
        cfg = compose([a for a in argv if "=" in a and not a.startswith("-")], config_name=config_name)
        if config_name == "config":
            validate_config(cfg)
    except UqloraError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any composition failure is reported with the command
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    return None


@pytest.mark.parametrize("cmd", PY, ids=str)
def test_every_documented_command_composes(cmd, fake_run):
    """As `python <script> <args> --cfg job` would: uqlora.cli.precheck's steps (resume=<dir> expanded, the
    overrides checked against every job of a sweep), then a single run's config composed and validated as
    tasks.train does before anything loads."""
    text = strip_comment(cmd.text)
    if " ... " in f" {text} ":
        pytest.skip("an abbreviated command (...)")
    argv = substitute(shlex.split(PLACEHOLDER.sub(lambda m: m.group(0).replace(" ", "_"), text))[2:], fake_run)
    if argv is None:
        pytest.skip("a placeholder stands for a config-group option")
    config_name = SCRIPTS[text.split()[1]]
    key = (config_name, *argv)
    if key not in _CHECKED:
        _CHECKED[key] = compose_error(argv, config_name)
    if _CHECKED[key]:
        pytest.fail(f"{cmd}\n  no longer composes: {_CHECKED[key]}", pytrace=False)


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, flags=re.M))
    missing = []
    for cmd in MAKE:
        for tok in shlex.split(strip_comment(cmd.text))[1:]:
            if "=" not in tok and not tok.startswith("-") and tok not in targets:
                missing.append(f"{cmd} (no target '{tok}' in the Makefile)")
    assert MAKE, "no make commands found"
    assert not missing, "\n".join(missing)


def test_scripts_run_by_the_docs_exist():
    missing = []
    for cmd in OTHER_PY:
        scripts = [t for t in cmd.text.split() if t.endswith((".py", ".ipynb"))]
        missing += [f"{cmd} ({s} does not exist)" for s in scripts if not (ROOT / s).is_file()]
    assert OTHER_PY, "no python scripts found"
    assert not missing, "\n".join(missing)


def test_repository_paths_named_by_the_docs_exist():
    """Every path in inline code that names a file or folder of the repository (`src/uqlora/tasks.py`,
    `conf/method/`, `methods/posthoc.py` under src/uqlora) exists."""
    missing = []
    for page in PAGES:
        _, prose = fenced_and_prose(page.read_text())
        for i, line in prose:
            for m in INLINE.finditer(line):
                tok = m.group(1).strip()
                if any(c in tok for c in "<*{ "):
                    continue
                if REPO_PATH.match(tok):
                    path = ROOT / tok
                elif PKG_PATH.match(tok):
                    path = ROOT / "src" / "uqlora" / tok
                else:
                    continue
                if not path.exists():
                    missing.append(f"{rel(page)}:{i}: `{tok}`")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_the_readme_layout_names_existing_files():
    """The "Where things are" block: top-level names from the repository root, indented ones from src/uqlora."""
    text = README.read_text()
    block = text.split("## Where things are", 1)[1].split("```", 2)[1]
    missing, seen = [], 0
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        base = ROOT / "src" / "uqlora" if line.startswith("  ") else ROOT
        for name in (n.strip() for n in names.split(",")):
            seen += 1
            if not (base / name).exists():
                missing.append(f"{name} ({base / name})")
    assert seen > 20 and not missing, missing


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, prose = fenced_and_prose(page.read_text())
    return {slug(line.lstrip("#")) for _, line in prose if re.match(r"^#{1,6} ", line)}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        _, prose = fenced_and_prose(page.read_text())
        for i, line in prose:
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                if not dest.exists():
                    broken.append(f"{rel(page)}:{i}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{rel(page)}:{i}: {target} (no heading '#{anchor}' in {dest.name})")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text())}
    unlinked = [rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages a newcomer cannot find from the README: {unlinked}"


def test_the_readme_stays_short():
    n = len(README.read_text().splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; the rest belongs in docs/ (limit {README_MAX_LINES})"
