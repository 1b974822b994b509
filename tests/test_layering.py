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


def test_only_dist_imports_deepspeed_and_torch_distributed():
    owners = {path.name for path in PACKAGE.rglob("*.py")
              if any(m == "deepspeed" or m.startswith(("deepspeed.", "torch.distributed")) for m in imported_modules(path))}
    assert owners == {"dist.py"}


def test_nothing_resizes_the_vocabulary():
    for path in PACKAGE.rglob("*.py"):
        assert "resize_token_embeddings" not in path.read_text(), path


def test_nothing_imports_train():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "train.py":
            assert "tagscale.train" not in imported_modules(path), path


ROOT = PACKAGE.parent
TOOLS = ROOT / "tools"
TORCH_FREE = ("shapes.py", "planner.py", "launch.py", "scaling.py", "sweep.py", "inputs.py", "records.py", "runfolder.py",
              "dsconfig.py")
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
    code = "import sys, " + ", ".join(f"tagscale.{n[:-3]}" for n in TORCH_FREE) + "; print('torch' in sys.modules)"
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
    names = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | {"recipes/"}
    names |= {p.name for p in TOOLS.iterdir() if p.suffix in (".py", ".sh")}
    missing = {n for n in names if n not in layout}
    assert not missing, f"README's layout omits {sorted(missing)}"
