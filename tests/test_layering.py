"""Structure rules that keep the code honest."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tagscale"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "torch":
                names |= {f"torch.{alias.name}" for alias in node.names}
    return names


def test_one_module_imports_deepspeed_and_torch_distributed():
    """One owner: runtime/distributed/dist.py is the only module that imports deepspeed or torch.distributed (the
    rest of the distributed room composes its primitives), and nothing reaches torch.distributed through `torch.`."""
    owners = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
              if any(m == "deepspeed" or m.startswith(("deepspeed.", "torch.distributed")) for m in imported_modules(path))}
    assert owners == {"runtime/distributed/dist.py"}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "dist.py":
            code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
            assert "torch.distributed." not in code.replace('"""', ""), path


def test_nothing_resizes_the_vocabulary():
    for path in PACKAGE.rglob("*.py"):
        assert "resize_token_embeddings" not in path.read_text(), path


def test_nothing_imports_train():
    """train.py is the entry and nothing imports it; the trainer it loads once the inputs are checked is its alone."""
    for path in PACKAGE.rglob("*.py"):
        assert "tagscale.train" not in imported_modules(path), path
        if path.name != "train.py":
            assert "tagscale.trainer" not in imported_modules(path), path


ROOT = PACKAGE.parent
TOOLS = ROOT / "tools"
TORCH_FREE = ("shapes.py", "study/planner.py", "study/devices.py", "study/plan_text.py", "launch.py", "study/scaling.py",
              "study/results.py", "study/finding.py", "study/curves.py", "study/forecast.py",
              "study/sweep.py", "runtime/inputs.py", "data/records.py", "data/fields.py", "runtime/runfolder.py",
              "runtime/dsconfig.py")
"""Modules that answer at once (the planner's CLI, the sweep's jobs and readers, the checks before a run loads
torch): no torch, transformers or deepspeed."""
MOVED = {"Shape", "Setup", "Plan", "Device", "plan", "recommend", "resolve_shape", "preset_shapes", "render",
         "memory_by_part", "cross_node_bytes", "RunRow", "read_run", "gather", "table", "plots", "learning_plot",
         "write_report", "trainer_command", "launch_env", "SHAPES", "LAUNCH_VARS", "Job", "base_name", "base_overrides",
         "check_base", "read_stage", "plan_jobs", "job_command", "run_local", "record_timings", "submit_slurm"}
"""Library code that lives in the package: a tool defining one of these again is a second copy."""


def test_torch_free_modules_import_no_torch():
    for name in TORCH_FREE:
        heavy = {m for m in imported_modules(PACKAGE / name) if m.split(".")[0] in ("torch", "transformers", "deepspeed")}
        assert not heavy, (name, heavy)
    # and nothing they import pulls it in either (tagscale.metrics, errors ...)
    code = "import sys, " + ", ".join(f"tagscale.{n[:-3].replace('/', '.')}" for n in TORCH_FREE) + "; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_tools_are_thin_command_lines():
    """tools/*.py import their logic from tagscale: no ast reading of package sources, no other tool imported as a
    module, no copy of what the package owns, and sys.path touched at most once, to put the checkout's root first
    (so `python tools/x.py` runs this checkout's package, installed or not)."""
    tools = {p.stem for p in TOOLS.glob("*.py")}
    for path in sorted(TOOLS.glob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        imports = imported_modules(path)
        assert "ast" not in imports and not (imports & tools), (path.name, imports & (tools | {"ast"}))
        assert any(m == "tagscale" or m.startswith("tagscale.") for m in imports), f"{path.name} imports no tagscale"
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        assert not defined & MOVED, (path.name, defined & MOVED)
        inserts = [line.strip() for line in source.splitlines() if "sys.path" in line]
        assert len(inserts) <= 1, (path.name, inserts)
        assert all(line.startswith(("sys.path.insert(0, str(ROOT))", "sys.path.insert(0, str(Path(__file__).resolve()"
                                    ".parents[1]))")) for line in inserts), (path.name, inserts)


def test_readme_layout_names_every_module_and_tool():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    names = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"} | {"recipes/"}
    names |= {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.name for p in TOOLS.iterdir() if p.suffix in (".py", ".sh")}
    missing = {n for n in names if n not in layout}
    assert not missing, f"README's layout omits {sorted(missing)}"


# ----------------------------------------------------------------------------------------------------------------
# The layers, declared once: a module may import from its own layer and the layers below it, never above.

LAYERS = (
    ("tagscale", "errors", "cache", "metrics", "launch", "shapes"),  # leaves: no torch, nothing above
    ("config_io", "config"),  # the typed recipe (config), over the generic YAML-to-dataclass reader (config_io)
    ("methods", "core"),  # what a method trains; tags, heads, the loss, the ridge maths
    ("data",),  # sources, records, fields, encoding and batches
    ("runtime",),  # process group and engine, bases, run folders, the checks before torch, the log
    ("eval",),  # scoring, the kept step, predict
    ("trainer",),  # one stage's session, step loop, checkpoints and outputs (loaded by train.py after its checks)
    ("study",),  # the scaling study: planner, sweep, scaling, report, expert, demo
    ("train", "evaluate", "predict", "demo"),  # entry points
)
LAYER_OF = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The layer's unit: a subpackage (tagscale.runtime.dist -> runtime) or a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_imports() -> dict[str, set[str]]:
    """Every tagscale module -> the tagscale modules it imports, at the top or inside a function."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_every_room_has_a_layer():
    rooms = {room(m) for m in package_imports()}
    assert rooms <= set(LAYER_OF), f"declare a layer for {sorted(rooms - set(LAYER_OF))} in LAYERS"


def test_no_import_reaches_a_higher_layer():
    upward = [(m, t) for m, targets in package_imports().items() for t in targets
              if LAYER_OF[room(t)] > LAYER_OF[room(m)]]
    assert not upward, "imports from a lower layer to a higher one: " + ", ".join(f"{m} -> {t}" for m, t in upward)


def test_no_import_circle():
    """Tarjan's strongly connected components over every import, function-local ones included."""
    graph = package_imports()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two rules above fail on a constructed package with a function-local circle and an upward import."""
    pkg = tmp_path / "tagscale"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from tagscale.runtime.dist import g\n")
    (pkg / "runtime" / "dist.py").write_text("from tagscale.config import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    import pytest

    with pytest.raises(AssertionError, match="config -> tagscale.runtime.dist"):
        test_no_import_reaches_a_higher_layer()
    with pytest.raises(AssertionError, match="tagscale.config"):
        test_no_import_circle()


def test_no_private_name_crosses_a_module():
    crossings = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tagscale"):
                crossings += [f"{module_name(path)} imports {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossings, crossings


def test_the_planner_command_line_imports_no_torch():
    """`tools/plan.py` answers for an embedded base without loading torch, transformers or deepspeed."""
    code = ("import runpy, sys; sys.argv = ['plan.py', 'embedded:smollm2-135m']; "
            "sys.path.insert(0, 'tools')\ntry:\n    runpy.run_path('tools/plan.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:] + proc.stderr[-2000:]


def test_the_package_carries_no_test_hook():
    """Tests reach inside a run through tests/hooks (a sitecustomize on PYTHONPATH), never through the package."""
    hooks = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "TAGSCALE_TEST" in p.read_text()]
    assert not hooks, hooks


OWNED_TEXT = {
    '"embedded:"': {"shapes.py"},  # shapes.embedded_name / base_kind: what a base string names
    "looks like a hub id": {"shapes.py"},  # shapes.no_such_folder
    "submodule_search_locations": {"cache.py"},  # cache.package_dir
    "interval[0] > 0": {"metrics.py"},  # metrics.beyond_zero
    '"mse": ': {"metrics.py"},  # metrics.HIGHER_IS_BETTER: a metric's direction
    '"COMPLETE"': {"runtime/runfolder.py"},  # runfolder.CHECKPOINT_DONE
}
"""Text that decides a fact, and the one module allowed to write it (tests/test_one_rule.py checks that the callers
agree with each owner on inputs a copy would misjudge); slurm/*.sh ask the owners through `python -m`."""


def test_each_rule_is_written_in_its_owner_only():
    copies = [(text, str(path.relative_to(PACKAGE))) for path in PACKAGE.rglob("*.py")
              for text, owners in OWNED_TEXT.items()
              if text in path.read_text() and str(path.relative_to(PACKAGE)) not in owners]
    assert not copies, copies
    launch = (ROOT / "slurm" / "launch.sh").read_text()
    assert "tagscale.runtime.runfolder --complete" in launch and '"status"' not in launch
    assert "tagscale.shapes --launch" in launch and "embedded:*)" not in launch


def test_every_attribute_read_from_a_tagscale_module_exists():
    """`from tagscale.x import name` (at the top or inside a function) and `module.name` where `module` is a
    tagscale module imported by name (`from tagscale.study import planner`): the name must exist there. A move that
    left a reader behind (a function-local import in a test, a tool run only on a GPU) fails here, not later."""
    import importlib

    missing = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(TOOLS.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tagscale"):
                owner = importlib.import_module(node.module)
                for alias in node.names:
                    try:
                        modules[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:  # a name, not a module
                        if not hasattr(owner, alias.name):
                            missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} has no {alias.name}")
        missing += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules and not hasattr(modules[node.value.id], node.attr)]
    assert not missing, missing


def test_no_function_is_over_80_lines():
    """One function, one screen: a function (docstring included) that outgrows 80 lines is split along its jobs."""
    long = [f"{path.relative_to(PACKAGE)}::{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
