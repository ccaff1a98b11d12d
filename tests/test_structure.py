"""The package's shape: no module past its line budget, and an import graph that follows LAYERS.

Both checks are strict both ways: a new problem fails, and so does an exception or allowed problem
that no longer exists (remove it from the table here), so the tables only ever hold what is true.
"""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The most lines a module may have, by the longest matching folder. Passes and kernels are kept to a
# screenful or two each (STYLE.md 1 and 9); anything else splits by job before 800 lines.
BUDGETS = {"moa_fx/passes/": 300, "moa_fx/kernels/": 400, "moa_fx/": 800}

# Modules over budget today, each with the most lines it may have until it is split: growing one
# is a decision, made here.
OVER_BUDGET: dict[str, int] = {}

# Problems docs/import_graph.py reports today (its own wording). Empty is the goal.
KNOWN_IMPORT_PROBLEMS: set[str] = set()


def _budget(rel: str) -> int:
    return max(((len(prefix), n) for prefix, n in BUDGETS.items() if rel.startswith(prefix)))[1]


def _line_counts() -> dict[str, int]:
    return {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
            for p in sorted((ROOT / "moa_fx").rglob("*.py"))}


def test_modules_stay_within_line_budget():
    counts = _line_counts()
    over = {rel: n for rel, n in counts.items() if n > _budget(rel)}
    grown = {rel: (n, OVER_BUDGET[rel]) for rel, n in over.items() if rel in OVER_BUDGET and n > OVER_BUDGET[rel]}
    new = {rel: (n, _budget(rel)) for rel, n in over.items() if rel not in OVER_BUDGET}
    stale = sorted(rel for rel in OVER_BUDGET if rel not in over)
    assert not new, f"past the line budget (lines, budget): {new}; split the module, or list it in OVER_BUDGET"
    assert not grown, f"grown past its OVER_BUDGET cap (lines, cap): {grown}"
    assert not stale, f"within budget or gone now: remove {stale} from OVER_BUDGET"


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_graph_follows_layers():
    found = set(_import_graph().problems(ROOT))
    new = sorted(found - KNOWN_IMPORT_PROBLEMS)
    fixed = sorted(KNOWN_IMPORT_PROBLEMS - found)
    assert not new, "import graph problems (python docs/import_graph.py draws the graph):\n" + "\n".join(new)
    assert not fixed, "fixed now: remove from KNOWN_IMPORT_PROBLEMS:\n" + "\n".join(fixed)


def test_import_graph_sees_deferred_imports(tmp_path):
    """The check reads imports inside functions, relative ones and the facade's names, and finds a
    cycle through them."""
    graph = _import_graph()
    package = tmp_path / "moa_fx"
    package.mkdir()
    (package / "__init__.py").write_text("from moa_fx.runtime import x\n")
    (package / "spec.py").write_text("def f():\n    from .runtime import y\n")
    (package / "runtime.py").write_text("from . import spec\n")
    (package / "stray.py").write_text("from moa_fx import x\n")
    assert graph.problems(tmp_path) == ["backward: spec (spec) -> runtime (runtime)",
                                        "cycle: runtime -> spec -> runtime", "unlayered: stray"]
    assert [(e.importer, e.imported, e.deferred) for e in graph.import_edges(tmp_path)] == [
        ("moa_fx.runtime", "moa_fx.spec", False), ("moa_fx.spec", "moa_fx.runtime", True),
        ("moa_fx.stray", "moa_fx.runtime", False)]


def test_only_the_cli_default_run_imports_the_eval_package():
    """moa_fx.eval sits behind the [eval] extra: the compiler and the trainer (moa_fx.train) never import it
    (LAYERS puts them before it); the CLI reaches it only inside functions of moa_fx.cli.real_task, the
    default run of ``moa-fx train``, so ``import moa_fx.cli`` and ``--model small-llama`` load none of it."""
    edges = _import_graph().import_edges(ROOT)
    into_eval = {(e.importer, e.deferred) for e in edges
                 if e.imported.startswith("moa_fx.eval") and not e.importer.startswith("moa_fx.eval")}
    assert into_eval == {("moa_fx.cli.real_task", True)}


def test_test_packages_cannot_shadow_importable_packages():
    """pytest puts tests/ on sys.path, so a test package there is importable by its bare name.

    A package named like a library (tests/kernels once was) shadows it for everything in the run:
    transformers 5.25 probes the optional `kernels` package and imported ours instead, failing
    every model build. Test packages are named test_*, which no library is.
    """
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("__init__.py"))
    assert packages, "no test packages found: the check would pass vacuously"
    bad = [p for p in packages if not pathlib.PurePosixPath(p).name.startswith("test_")]
    assert not bad, f"rename these test packages to test_<name> (a bare name can shadow a library): {bad}"
