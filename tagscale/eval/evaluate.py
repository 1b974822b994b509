"""A run's evaluation: every rank scores its shard of each held-out set, the results are gathered and reduced.

Regression heads: MSE, MAE, Pearson, Spearman, R². Classification heads: accuracy (and, for the probe of a
binary head, ROC-AUC). Text tasks: BLEU and chrF
of greedy `generate` output with the tags in the prompt. Next-token tasks (stage 1): loss and perplexity.
Beside each task can stand its baselines: the run's starting point (initial tags, untrained heads) and a
closed-form ridge probe on the frozen base's last prompt token (no tags), fitted on the training set.

    python -m tagscale.evaluate --run runs/stage3 [--limit N] [--json] [--base FOLDER [--transfer]]   # one process; the recipe is the run's own

The parts: held-out sets (sets.py), sharded inference (inference.py), scoring with bootstrap intervals (scoring.py),
the ridge maths (ridge.py), the probe and probe-started heads (probe.py), tables (tables.py). Here: the baselines
before training (saved as JSON), the probe start, the trained model after, and the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

from tagscale.config import RunConfig
from tagscale.core.model import TaggedModel
from tagscale.data.encode import Encoder, Example
from tagscale.data.encoded_cache import encode_task
from tagscale.data.train_data import task_records
from tagscale.eval.inference import evaluate
from tagscale.eval.probe import fit_probe_heads, probe_metrics, support_set
from tagscale.eval.scoring import metric_columns, scored, task_kind
from tagscale.eval.sets import EvalSet, eval_sets
from tagscale.eval.tables import format_table
from tagscale.metrics import PRIMARY, PROBE_START, beyond_zero, paired_difference, start_row, to_json
from tagscale.runtime.distributed import dist


def baselines_path(cfg: RunConfig) -> Path:
    """Where a run keeps its before-training metrics, so that a resumed run reports the same ones."""
    return Path(cfg.output.dir) / "eval_baselines.json"


def save_baselines(cfg: RunConfig, results: dict[str, dict[str, dict]]) -> None:
    """Write the before-training metrics (rank 0)."""
    if dist.is_main():
        baselines_path(cfg).parent.mkdir(parents=True, exist_ok=True)
        baselines_path(cfg).write_text(to_json(results, indent=2))


def baselines(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer) -> dict[str, dict[str, dict]]:
    """Before training: the starting point (initial tags, untrained heads) and, for head tasks, the probe.

    Saved in the run folder so that a resumed run reports the same baselines. Collective.
    """
    path = baselines_path(cfg)
    if path.is_file():
        return json.loads(path.read_text())
    out: dict[str, dict[str, dict]] = {}
    sets = eval_sets(cfg, encoder)
    resamples = cfg.evaluation.bootstrap
    for item in sets:  # heads start at zero: before training each one predicts its training-label mean
        if task_kind(model, item.task) == "regression":
            head = model.heads[model.head_names.index(item.task.head)]
            out[item.task.name] = {"initial": scored("regression", [float(head.mean[0])] * len(item.examples), item,
                                                     resamples)}
    for task, metrics in evaluate(cfg, model, encoder, tokenizer, [s for s in sets if s.task.name not in out]).items():
        out.setdefault(task, {})["initial"] = metrics
    if cfg.evaluation.baselines and any(t.loss == "head" for t in cfg.tasks):
        from tagscale.methods import apply_method

        kept = [i for i, t in enumerate(cfg.tasks) if t.loss == "head"]
        probe_cfg = apply_method(dataclasses.replace(cfg, method="linear_probe", tasks=[cfg.tasks[i] for i in kept]), {})
        probe_encoder = Encoder(tokenizer, encoder.placeholders, set(), encoder.head_names, encoder.max_length)
        test = eval_sets(probe_cfg, probe_encoder)
        train, val = [], []
        for j, i in enumerate(kept):  # the run's own training / validation split of each task
            if cfg.tasks[i].train is None:
                continue
            for part, records in zip((train, val), task_records(cfg, i)):
                if records:
                    part.append(EvalSet(probe_cfg.tasks[j], j, encode_task(probe_encoder, probe_cfg.tasks[j], j, records,
                                                                           "skip", cfg.tasks[i].name)[0]))
        for task, metrics in probe_metrics(probe_cfg, model, train, val, test, tokenizer.pad_token_id).items():
            out.setdefault(task, {})["linear probe"] = metrics
    save_baselines(cfg, out)
    return out


def start_heads_from_probe(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer,
                           train_examples: list[list[Example]], val_sets: list[EvalSet], before: dict) -> dict:
    """Heads with `init: probe` start at the ridge fit on the hidden states at their function tag (initial tags)
    over the training set, the penalty chosen on the validation set (a classifier: `classifier_start`); their
    tasks' test metrics at that start join the baselines as "linear probe (start)". A head with `fit:
    closed_form` or `crossfit` gets its support set (`tagscale.core.ridgehead`) from the same features. Collective; run
    once, on a fresh start (a resumed run reads its heads and support sets from the checkpoint)."""
    starting = [t for t in cfg.tags if t.head and t.head.init == "probe"]
    if not starting:
        return before
    fits = fit_probe_heads(cfg, model, tokenizer, train_examples, val_sets)
    for tag in starting:
        head = model.heads[model.head_names.index(tag.name)]
        if tag.head.penalty == "probe":  # units-free: the same lambda for standardised labels and w / std
            head.penalty = fits[tag.name]["penalty"]
        if tag.head.fit != "gradient":
            model.supports[model.head_names.index(tag.name)] = support_set(cfg, tag, head, train_examples,
                                                                           fits[tag.name])
    if not cfg.evaluation.enabled:
        return before
    names = {t.name for t in starting}
    sets = [s for s in eval_sets(cfg, encoder) if s.task.head in names]
    out = {task: dict(models) for task, models in before.items()}
    for task, metrics in evaluate(cfg, model, encoder, tokenizer, sets).items():
        out.setdefault(task, {})[PROBE_START] = metrics
    save_baselines(cfg, out)
    return out


def compare_with_start(model: TaggedModel, item: EvalSet, trained: dict, by_model: dict, resamples: int) -> Optional[dict]:
    """The trained model's headline metric minus its starting point's (the probe start where the head began
    there, else the initial tags), with a 95% paired-bootstrap interval over the test examples."""
    against = start_row(by_model)
    kind = task_kind(model, item.task)
    if against is None or "outputs" not in by_model[against]:
        return None
    metric, higher = PRIMARY[kind]
    metric_fn, columns_a = metric_columns(kind, trained["outputs"], item)
    _, columns_b = metric_columns(kind, by_model[against]["outputs"], item)
    diff = paired_difference(metric_fn, metric, columns_a, columns_b, resamples=resamples)
    interval = diff["ci95"]
    if interval is None or not math.isfinite(diff["diff"]):
        verdict = "no interval"
    elif beyond_zero(interval):
        verdict = "better, beyond the interval" if (beyond_zero(interval) > 0) == higher else "worse, beyond the interval"
    else:
        verdict = "within the interval (no clear difference)"
    return diff | {"against": against, "verdict": verdict}


def final(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer, before: dict,
          selected: Optional[dict] = None) -> dict[str, dict[str, dict]]:
    """After training: the trained model (the selected step's, `selected` naming it) beside the baselines, each
    compared with its start; eval.json and a printed table (rank 0)."""
    out = {task: dict(models) for task, models in before.items()}
    sets = eval_sets(cfg, encoder)
    kept_start = {}  # validation kept step 0: the start's test outputs are the trained model's, already scored
    for item in sets if selected and selected.get("best_step") == 0 else []:
        start = start_row(out.get(item.task.name, {}))
        if start and "outputs" in out[item.task.name][start]:
            kept_start[item.task.name] = copy.deepcopy(out[item.task.name][start])
    scored_now = evaluate(cfg, model, encoder, tokenizer, [s for s in sets if s.task.name not in kept_start])
    for item in sets:
        task = item.task.name
        metrics = kept_start[task] if task in kept_start else scored_now[task]
        metrics["vs_start"] = compare_with_start(model, item, metrics, out.get(task, {}), cfg.evaluation.bootstrap)
        out.setdefault(task, {})["trained"] = metrics | ({"selected": selected} if selected else {})
    if dist.is_main():
        (Path(cfg.output.dir) / "eval.json").write_text(to_json(out, indent=2))
        print(format_table(out), flush=True)
    return out

def main(argv: list[str] | None = None) -> int:
    """Evaluate a finished run's tags and heads on its tasks' held-out sets (one process)."""
    import argparse

    from tagscale.config import BaseConfig, EvalConfig, RunConfig, build, check_range
    from tagscale.methods import apply_method
    from tagscale.runtime.runfolder import read_run_json
    from tagscale.runtime.runs import load_for_inference

    parser = argparse.ArgumentParser(prog="tagscale.eval.evaluate", description=main.__doc__)
    parser.add_argument("--run", required=True, help="a complete run folder")
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--base", help="base folder (default: the one the run was trained on, where it was then)")
    parser.add_argument("--transfer", action="store_true",
                        help="evaluate the run's tags on a base other than the one they were trained on")
    args = parser.parse_args(argv)
    folder = Path(args.run)
    meta = read_run_json(folder, "--run")
    recipe = build(RunConfig, {k: v for k, v in meta["config"].items() if k != "source"}, str(folder / "run.json"))
    recipe.source = str(folder / "run.json")
    if args.limit is not None:
        check_range(EvalConfig, "limit", args.limit, "--limit", "command line")  # the recipe's range for it
    recipe.evaluation.limit = args.limit or recipe.evaluation.limit
    cfg = apply_method(recipe, {name: info["p"] for name, info in meta["tags"].items()})
    model, base = load_for_inference([folder], BaseConfig(path=args.base) if args.base else None, args.transfer)
    encoder = Encoder(base.tokenizer, {s.name: model.bank.placeholder_ids(s.name) for s in model.bank.specs}, set(),
                      model.head_names, cfg.train.max_length)
    results = {task: {"trained": metrics} for task, metrics in evaluate(cfg, model, encoder, base.tokenizer).items()}
    print(to_json(results, indent=2) if args.json else format_table(results))
    return 0


def cli() -> None:
    from tagscale.errors import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
