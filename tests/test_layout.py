"""The package's layout holds: no import cycle (counting imports inside functions too), no lower layer importing a
higher one, and every module imports on its own in a fresh interpreter (no cycle hidden by import order).

Layers, bottom to top (docs/development.md, "Layout"): config, algorithms, engine, weight_transfer, learner_core, data < judge < worlds < stages < runtime
< serve, tools, cli. A module may import its own layer and the ones below it."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlaif_ray"
LAYERS = {"rlaif_ray": 0, "config": 0, "user_code": 0, "algorithms": 0, "engine": 0, "console": 0, "weight_transfer": 0, "learner_core": 0, "data": 0, "judge": 1, "worlds": 2,
          "stages": 3, "runtime": 4, "serve": 5, "tools": 5, "cli": 5}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["rlaif_ray"]


def package_imports(modules: list[str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (module level or inside a function)."""
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module in modules:
        path = PACKAGE.parent / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names}
        graph[module] = {t for t in targets if t in known and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_checks_catch_what_they_are_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("rlaif_ray.runtime.orchestrator") > layer("rlaif_ray.stages.rollout") > layer("rlaif_ray.data.schemas")


def test_no_import_cycles_even_inside_functions():
    cycle = find_cycle(package_imports(module_names()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_lower_layer_imports_a_higher_one():
    graph = package_imports(module_names())
    assert len(graph) > 30 and all(m.split(".")[1] in LAYERS for m in graph if "." in m)
    upward = sorted(f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
                    for src, dsts in graph.items() for dst in dsts if layer(dst) > layer(src))
    assert not upward, "\n".join(upward)


# Imports each module named on the command line in a child forked from an interpreter that holds only the third-party
# libraries: each child starts with no module of this project loaded, as a fresh interpreter would, without paying
# torch's, Ray's and pyarrow's imports again (~0.5 s each, for ~70 modules). Prints one line per failure.
IMPORT_EACH = """
import importlib, os, sys, traceback
import numpy, pyarrow, pydantic, ray, torch, transformers, yaml
assert not [m for m in sys.modules if m.split(".")[0] in ("rlaif_ray", "rlaif_lab")]
running = {}

def reap():
    pid, status = os.wait()
    name = running.pop(pid)
    if status != 0 and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3):  # (3: it printed why)
        print(name, "| the child died:", status, flush=True)

for name in sys.argv[1:]:
    if len(running) == 2:  # two at a time: two cores
        reap()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(name, "|", traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(3)
        os._exit(0)
    running[pid] = name
while running:
    reap()
"""


def import_failures(modules: list[str]) -> list[str]:
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH, *modules], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.splitlines()


def test_every_module_imports_on_its_own():
    assert not import_failures(module_names())


def test_a_module_that_cannot_import_alone_is_named():
    assert import_failures(["json", "rlaif_ray.no_such_module", "rlaif_ray.config"]) == [
        "rlaif_ray.no_such_module | ModuleNotFoundError: No module named 'rlaif_ray.no_such_module'"]


def test_the_runtime_never_imports_the_lab():
    """rlaif_lab (what only jobs/ scripts share) sits beside the package: nothing in rlaif_ray imports it, so a user's
    install never needs it; and each of its modules imports on its own."""
    lab = PACKAGE.parent / "rlaif_lab"
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(PACKAGE.parent)} imports {n}" for n in names if n.split(".")[0] == "rlaif_lab"]
    assert not found, found
    modules = [f"rlaif_lab.{p.stem}" for p in sorted(lab.glob("*.py")) if p.stem != "__init__"]
    assert len(modules) == 9
    assert not import_failures(modules)
