"""The layout's rules, checked on the modules' own imports (read with ``ast``, nothing is run):

* the import graph of the project's modules has no circle;
* no import runs back up the layers (below), and the two halves, ``training/`` and ``search/``,
  never import each other: only the entry scripts join them;
* entry scripts import libraries, not each other, except ``train_multiple`` reusing ``train``'s
  public parser;
* no module takes another's ``_private`` name; nothing outside ``tests/`` imports from it;
* every module, ``bench/``'s included, is at most 600 lines and every function at most 60,
  argument-parser builders excepted (``get_args_parser``, ``add_*_args``: one flag after another);
* the library (every module but ``tests/`` and ``bench/``) imports no test or browser tooling:
  test support lives in ``tests/``, a benchmark's clients in ``bench/``.
* no test module imports another: fixtures are shared through ``conftest.py``, plain helpers
  through support modules (``tests/support.py``).

Imports inside functions count like top-level ones: a late import is still a dependency.
"""

import ast
from pathlib import Path
import re

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dataio", "training", "search")
ENTRY_SCRIPTS = ("train", "evaluate", "train_multiple", "app_stanford", "shards", "export", "audit")
# A module may import only modules of a lower layer, or of its own package (acyclically).
LAYERS = {
    "dataio": 0,
    "losses": 0,
    "preprocessing": 0,
    "devices": 0,
    "samplers": 0,
    "loaders": 0,
    "knn": 0,
    "calibration": 0,
    "checkpoints": 1,
    "data_stats": 1,
    "backbones": 2,
    "models": 3,
    "datasets": 4,
    "explain": 4,
    "extraction": 4,
    "retrieval": 5,
    "onnx_export": 5,
    "inference": 6,
    "training": 7,
    "search": 7,
    **{name: 8 for name in ENTRY_SCRIPTS},
}
ALLOWED_ENTRY_IMPORTS = {("train_multiple", "train")}  # train.py's public parser (and main, in-process)
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 60
# Functions that only declare flags, one add_argument after another: long by nature, read as a list.
PARSER_BUILDER = re.compile(r"get_args_parser|add_\w+_args")
# Test and browser tooling: a library module importing one ships test support.
TEST_TOOLING = {"pytest", "hypothesis", "selenium", "playwright", "unittest"}


def project_files(*, bench=False):
    """Project modules (top level and packages), as {dotted name: path}; bench/ scripts with
    ``bench=True``."""
    files = {p.stem: p for p in REPO.glob("*.py")}
    for pkg in PACKAGES:
        files.update({f"{pkg}.{p.stem}": p for p in (REPO / pkg).glob("*.py") if p.stem != "__init__"})
    if bench:
        files.update({f"bench/{p.stem}": p for p in (REPO / "bench").glob("*.py")})
    return files


def group(module: str) -> str:
    """The layer a module belongs to: its package, or itself at the top level."""
    return module.split(".")[0]


def local_imports(path: Path, known: set) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:  # from dataio import catalogue
                    found.append((sub, [], node.lineno))
                elif node.module in known:  # from dataio.catalogue import read_catalogue
                    found.append((node.module, [a.name], node.lineno))
    return found


def import_graph() -> dict[str, set]:
    files = project_files()
    return {m: {t for t, _, _ in local_imports(p, set(files))} - {m} for m, p in files.items()}


def find_circle(graph: dict[str, set]) -> list[str] | None:
    """One circle of the graph as a path [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_find_circle_finds_one_and_only_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_circle_in_the_import_graph():
    graph = import_graph()
    assert len(graph) > 15 and graph["train"]  # the graph was read
    assert find_circle(graph) is None, f"import circle: {' -> '.join(find_circle(graph))}"


def test_no_import_runs_back_up():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            a, b = group(module), group(target)
            if a == b or (module, target) in ALLOWED_ENTRY_IMPORTS:
                continue
            if LAYERS[b] >= LAYERS[a]:
                wrong.append(f"{module} imports {target} (layer {LAYERS[a]} -> {LAYERS[b]})")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer():
    assert {group(m) for m in project_files()} <= set(LAYERS)


def private_uses(path: Path, known: set) -> list[str]:
    """``from X import _name`` and ``X._name`` where X is a project module of another file."""
    tree = ast.parse(path.read_text(), str(path))
    aliases, uses = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif node.module in known and a.name.startswith("_"):
                    uses.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            uses.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return uses


def test_no_private_name_crosses_a_module():
    files = project_files(bench=True)
    known = set(project_files())
    wrong = [u for p in files.values() for u in private_uses(p, known)]
    assert not wrong, "\n".join(wrong)


def test_private_use_is_detected(tmp_path):
    p = tmp_path / "x.py"
    p.write_text(
        "import models\nfrom dataio import fileio\nfrom retrieval import _num_threads\n"
        "models._helper()\nfileio.atomic_write_text\n"
    )
    assert private_uses(p, {"models", "dataio.fileio", "retrieval"}) == [
        "x.py:3 from retrieval import _num_threads",
        "x.py:4 models._helper",
    ]


def test_nothing_outside_tests_imports_from_tests():
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")} | {"tests", "conftest"}
    wrong = []
    for name, path in project_files(bench=True).items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            wrong += [f"{name}: {n}" for n in names if n.split(".")[0] in test_modules]
        assert 'tests"' not in path.read_text() and "'tests'" not in path.read_text(), (
            f"{path} puts tests/ on its import path"
        )
    assert not wrong, wrong


def test_tests_holds_tests_and_fixtures_only():
    for p in (REPO / "tests").glob("*.py"):
        text = p.read_text()
        assert (
            p.name.startswith("test_") or p.name == "conftest.py" or "fixture" in text.lower() or "reference" in p.stem
        ), f"{p} is neither a test nor a fixture"


def oversized(name: str, text: str) -> list[str]:
    """What in one module's ``text`` is over the limits: the module, and its functions that are
    not parser builders (a benchmark's functions excepted: a measurement reads as one script)."""
    too_long = []
    lines = text.count("\n")
    if lines > MAX_MODULE_LINES:
        too_long.append(f"{name}: {lines} lines")
    for node in ast.walk(ast.parse(text)):
        if name.startswith("bench/"):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not PARSER_BUILDER.fullmatch(node.name):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.{node.name}: {n} lines")
    return too_long


def test_oversized_finds_long_functions_but_not_parser_builders():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    text = f"def long():\n{body}\ndef get_args_parser():\n{body}\ndef add_model_args(p):\n{body}"
    assert oversized("m", text) == [f"m.long: {MAX_FUNCTION_LINES + 1} lines"]
    assert oversized("m", "x = 1\n" * (MAX_MODULE_LINES + 1)) == [f"m: {MAX_MODULE_LINES + 1} lines"]


def test_module_and_function_sizes():
    files = project_files(bench=True)
    assert any(name.startswith("bench/") for name in files)  # bench/ is read too
    too_long = [line for name, path in files.items() for line in oversized(name, path.read_text())]
    assert not too_long, "\n".join(too_long)


def imported_roots(path: Path) -> set[str]:
    """The top-level names of every module the file imports (``a`` of ``import a.b``)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_library_ships_no_test_support():
    wrong = {name: sorted(imported_roots(path) & TEST_TOOLING) for name, path in project_files().items()}
    wrong = {name: tools for name, tools in wrong.items() if tools}
    assert not wrong, f"library modules importing test tooling (move that code to tests/ or bench/): {wrong}"


def test_no_test_module_imports_another():
    tests = REPO / "tests"
    test_modules = {p.stem for p in tests.glob("test_*.py")}
    wrong = {p.name: sorted(imported_roots(p) & (test_modules | {"tests"})) for p in tests.glob("*.py")}
    wrong = {name: found for name, found in wrong.items() if found}
    assert not wrong, f"test modules importing test modules (share through conftest.py / support.py): {wrong}"
