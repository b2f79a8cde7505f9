"""The package's layers, read from the folders and from the modules' imports with ``ast``.

``sk_padim/core/`` is the torch core: its modules import only each other (no scikit-learn,
nothing of the package above them). The modules in ``sk_padim/`` itself (the base helpers,
the estimators, the evaluation and the front) may import the core and each other, but the
imports form no circle, so the modules have an order in which each needs only earlier ones.
An import inside a function (a lazy import) hides a dependency; each one needs a reason in
``LAZY_IMPORTS``. ``docs/architecture.md`` maps the modules.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sk_padim"
CORE = "core"

# (importer, imported) -> why the import sits inside a function.
_CLI_LAZY = (
    "sk-padim --help and usage errors answer without importing torch and scikit-learn "
    "(issue 23, item 11): the command imports the library inside the commands"
)
LAZY_IMPORTS = {
    ("cli", module): _CLI_LAZY
    for module in (
        "calibration",
        "conformal",
        "datasets",
        "demo",
        "evaluation",
        "export",
        "heatmaps",
        "persistence",
        "pipelines",
        "plotting",
        "score_run",
    )
}


def modules() -> list[str]:
    """Every module of the package, dotted below ``sk_padim`` (``"detector"``, ``"core.model"``)."""
    names = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names.append(".".join(parts))
    return sorted(names)


def in_core(name: str) -> bool:
    return name.split(".")[0] == CORE


def source(name: str) -> Path:
    path = PACKAGE.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(name: str) -> list[tuple[str, bool]]:
    """``(module, lazy)`` for each sk_padim module that module ``name`` imports."""
    tree = ast.parse(source(name).read_text(), filename=str(source(name)))
    package = name if source(name).name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((module, inner) for module in _targets(child, package))
            visit(child, inner)

    visit(tree, False)
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The sk_padim modules an import statement names (``""`` for the package itself)."""
    if isinstance(node, ast.Import):
        dotted = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: from . import x, from .x import y
            parts = ["sk_padim", *filter(None, package.split("."))]
            base = ".".join(parts[: len(parts) - node.level + 1])
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        # ``from sk_padim.core import images`` names the module sk_padim.core.images.
        dotted = [
            f"{module}.{alias.name}"
            if source(f"{module}.{alias.name}".removeprefix("sk_padim.")).exists()
            else module
            for alias in node.names
        ]
    targets = []
    for path in dotted:
        if path == "sk_padim":
            targets.append("")
        elif path.startswith("sk_padim."):
            targets.append(path.removeprefix("sk_padim."))
    return targets


def graph(lazy: bool = True) -> dict[str, set[str]]:
    return {
        name: {module for module, inner in imported_modules(name) if module and (lazy or not inner)}
        for name in modules()
    }


def test_the_package_has_a_core_subpackage():
    assert any(in_core(name) for name in modules())
    assert all(source(name).exists() for name in modules())


@pytest.mark.parametrize("name", [name for name in modules() if in_core(name)])
def test_the_core_imports_only_the_core(name):
    upward = [module or "sk_padim" for module, _ in imported_modules(name) if not in_core(module)]
    assert upward == [], f"{name} (torch core) imports the package above it: {upward}"


@pytest.mark.parametrize("name", modules())
def test_modules_import_defining_modules_not_the_package(name):
    if name == CORE:
        return
    assert "" not in {module for module, _ in imported_modules(name)}, (
        f"{name} imports the package sk_padim; import from the defining module"
    )


def circles(edges: dict[str, set[str]]) -> list[str]:
    """Each circle a depth-first search over ``edges`` meets, as ``"a -> b -> a"``."""
    state: dict[str, str] = {}
    found = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for module in sorted(edges.get(name, ())):
            if state.get(module) == "open":
                found.append(" -> ".join([*path[path.index(module) :], module]))
            elif module not in state:
                visit(module, [*path, module])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    return found


def test_the_imports_form_no_circle():
    """Every import counts, lazy ones included: a lazy import hides a circle, not removes it."""
    assert circles(graph(lazy=True)) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_lazy_imports_are_exactly_the_documented_ones():
    lazy = {
        (name, module) for name in modules() for module, inner in imported_modules(name) if inner
    }
    assert lazy == set(LAZY_IMPORTS)


def test_evaluation_neither_reads_datasets_nor_draws():
    assert {module for module, _ in imported_modules("evaluation")}.isdisjoint(
        {"plotting", "heatmaps", "datasets", "mvtec"}
    )
    assert "core.images" in {module for module, _ in imported_modules("datasets")}


def test_the_torch_core_imports_no_scikit_learn():
    users = []
    for name in (name for name in modules() if in_core(name)):
        tree = ast.parse(source(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            if "sklearn" in roots:
                users.append(name)
    assert users == []
