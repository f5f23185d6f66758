"""The shape of the package: data flows one way (no module imports a layer above its own), no import cycles
(lazy imports inside functions included), one job per module (no file over ~400 lines), Hydra's globals read
in one place only. Run as a script it prints the import graph by layer: `python tests/test_architecture.py`."""
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "uqlora"
MAX_LINES = 420

# config -> data -> backbone -> core math -> methods -> predictions -> report -> orchestration -> entry helpers.
# A module may import its own layer and the layers below; the first matching prefix gives the layer.
LAYERS = [
    ("foundation", ("errors", "io", "schema", "context", "distributed", "rundir", "logging_utils", "progress")),
    ("data", ("data",)),
    ("models", ("models",)),
    ("metrics", ("metrics",)),
    ("core", ("core",)),
    ("methods", ("callbacks", "methods")),
    ("predictions", ("predict", "evaluation", "sft_eval")),
    ("report", ("report",)),
    ("orchestration", ("runs", "validate", "config", "build", "sources", "fit", "overrides", "tasks")),
    ("entry", ("cli", "api")),
    ("results", ("results",)),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(mod: str) -> int:
    if mod == "":  # the package itself: its public API (imports from anywhere below)
        return [n for n, _ in LAYERS].index("entry")
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"module uqlora.{mod} is in no layer of tests/test_architecture.py: add it to LAYERS")


def imports_of(path: Path, mod: str) -> set[str]:
    """uqlora modules imported anywhere in the file (top level and inside functions)."""
    out = set()
    pkg = mod.split(".")[:-1] if path.name != "__init__.py" else mod.split(".")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = pkg[: len(pkg) - node.level + 1]
                names = [".".join(["uqlora", *base, node.module or ""]).rstrip(".")]
            else:
                names = [node.module or ""]
            names += [f"{names[0]}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("uqlora.") or n == "uqlora":
                target = n[len("uqlora."):] if n != "uqlora" else ""
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    g = {}
    for mod, path in files.items():
        deps = set()
        for t in imports_of(path, mod):
            # `from uqlora.x import y` names either module x.y or attribute y of x: keep the module that exists
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != mod and not (mod.startswith(t + ".") and files[t].name == "__init__.py" and t == mod.rpartition(".")[0]):
                deps.add(t)
        g[mod] = deps
    return g


def test_no_module_imports_a_layer_above_its_own():
    bad = [f"uqlora.{m} ({LAYERS[layer_of(m)][0]}) imports uqlora.{d} ({LAYERS[layer_of(d)][0]})"
           for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in g:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_packages_are_not_cycles_with_their_parents():
    """A package's __init__ that imports a submodule which imports the package back is a cycle Python hides."""
    g = graph()
    for mod, deps in g.items():
        for d in deps:
            assert mod not in g.get(d, set()), f"uqlora.{mod} <-> uqlora.{d}"


def test_no_source_file_is_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (one job per module): {long}"


def test_hydra_globals_are_read_in_one_place():
    readers = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "HydraConfig" in p.read_text())
    assert readers == ["context.py"], readers


def test_layers_name_every_module():
    for mod in graph():
        layer_of(mod)


if __name__ == "__main__":
    for i, (name, _) in enumerate(LAYERS):
        mods = sorted(m for m in graph() if layer_of(m) == i)
        print(f"{i} {name}: " + ", ".join(mods))
