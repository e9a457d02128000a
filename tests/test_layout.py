"""The package's shape: subpackages by stage, each importing only the stages below it (and
itself), and no module importing itself back through others. Read from the code's imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "sftforge"

# Lowest first. A module may import its own stage or any lower one, never a higher one or a
# sibling of the same height (models and curate know nothing of each other).
STAGES = {
    "foundation": 0,  # errors, console, atomic, plots, user_code, trackers
    "data": 1,
    "encode": 2,
    "models": 3,
    "curate": 3,
    "evaluation": 4,
    "export": 4,
    "config": 5,
    "training": 6,
    "api": 7,
    "face": 8,  # sftforge/__init__.py: the public API
    "cli": 9,
    "__main__": 10,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    parts = module.split(".")
    if module == "sftforge":
        return "face"
    if parts[1] in STAGES:
        return parts[1]
    return "foundation"


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports (anywhere in it)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("sftforge"):
                    targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("sftforge")}
        found[name] = {t for t in targets if t in modules and t != name}
    return found


def test_each_stage_imports_only_itself_and_the_stages_below():
    upward = [
        f"{source} ({stage(source)}) imports {target} ({stage(target)})"
        for source, targets in imports().items()
        for target in targets
        if stage(target) != stage(source) and STAGES[stage(target)] >= STAGES[stage(source)]
    ]
    assert upward == []


def test_no_module_imports_itself_back_through_others():
    graph = imports()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_cli_reaches_runs_and_their_results_only_through_the_public_api():
    graph = imports()
    for module in (m for m in graph if stage(m) == "cli"):
        reached = {stage(t) for t in graph[module]}
        assert "api" not in reached and "training" not in reached, module
