"""Evaluation: every rank scores its shard of each held-out set, the results are gathered and reduced.

Regression heads: MSE, MAE, Pearson, Spearman, R². Classification heads: accuracy. Text tasks: BLEU and chrF
of greedy `generate` output with the tags in the prompt. Next-token tasks (stage 1): loss and perplexity.
Beside each task can stand its baselines: the run's starting point (initial tags, untrained heads) and a
closed-form ridge probe on the frozen base's last prompt token (no tags), fitted on the training set.

    python -m tagscale.evaluate --runs runs/stage3 [--ds_config ds_configs/zero3_cpu.json] [--config recipe.yaml]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from tagscale import dist
from tagscale.config import RunConfig, TaskConfig
from tagscale.data import IGNORE, Encoder, Example, collate, encode_task, fill, read_records
from tagscale.metrics import classification_metrics, regression_metrics, translation_metrics
from tagscale.model import TaggedModel


@contextlib.contextmanager
def inference(cfg: RunConfig, model: TaggedModel) -> Iterator[None]:
    """Eval mode and, under ZeRO-3, the base gathered once for all of it (`evaluation.gather_base`). Collective."""
    was_training = model.training
    model.eval()
    try:
        with dist.whole_base_for_inference(model, cfg.evaluation.gather_base):
            yield
    finally:
        model.train(was_training)


@dataclass
class EvalSet:
    """A task's held-out examples, encoded as prompts (text tasks) or with labels (head tasks)."""

    task: TaskConfig
    index: int
    examples: list[Example]


def eval_sets(cfg: RunConfig, encoder: Encoder) -> list[EvalSet]:
    """The held-out set of every task that has one: its eval data, else the test split of a built-in source."""
    out = []
    for i, task in enumerate(cfg.tasks):
        data = task.eval
        if data is None and task.train is not None and task.train.builtin is not None:
            data = task.train
        if data is None:
            continue
        records = read_records(data, f"{cfg.source}: tasks[{i}].eval", "test")
        if cfg.evaluation.limit is not None:
            records = records[:cfg.evaluation.limit]
        examples, _ = encode_task(encoder, task, i, records, "skip", f"{cfg.source}: tasks[{i}].eval",
                                  with_target=task.loss != "target")
        out.append(EvalSet(task, i, examples))
    return out


def shard(items: list[Example], rank: int, world: int) -> tuple[list[Example], int]:
    """This rank's items, padded by blank repeats so that every rank runs the same number of forwards (ZeRO-3
    gathers parameters collectively: uneven counts would hang). Returns (items, how many are real)."""
    per_rank = math.ceil(len(items) / world)
    mine = items[rank * per_rank:(rank + 1) * per_rank]
    real = len(mine)
    blank = dataclasses.replace(items[-1], lm_targets=[IGNORE] * len(items[-1].ids))  # counts for nothing
    return mine + [blank] * (per_rank - real), real


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def head_predictions(model: TaggedModel, examples: list[Example], micro: int, pad_id: int) -> list[list[float]]:
    """Each example's head output in label units."""
    out = []
    for chunk in _batches(examples, micro):
        batch = {k: v.to(dist.device()) for k, v in collate(chunk, pad_id).items()}
        preds = model.predict_heads(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                    batch["head_pos"], batch["head_index"])
        rows: list = [None] * len(chunk)
        for j, values in enumerate(preds):
            positions = (batch["head_index"] == j).nonzero().squeeze(1).tolist()
            for pos, value in zip(positions, values.cpu().tolist()):
                rows[pos] = value if isinstance(value, list) else [value]
        out += rows
    return out


@torch.no_grad()
def generations(model: TaggedModel, tokenizer, examples: list[Example], micro: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of each prompt (left-padded; tags spliced by the embedding hooks)."""
    out = []
    for chunk in _batches(examples, micro):
        batch = collate(chunk, tokenizer.pad_token_id, padding_side="left")
        generated = model.base.generate(input_ids=batch["input_ids"].to(dist.device()),
                                        attention_mask=batch["attention_mask"].to(dist.device()),
                                        max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                        synced_gpus=dist.world_size() > 1)
        new = generated[:, batch["input_ids"].shape[1]:]
        out += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return out


@torch.no_grad()
def next_token_loss(model: TaggedModel, examples: list[Example], micro: int, pad_id: int) -> tuple[float, int]:
    """Summed cross-entropy and token count over the examples' next-token targets."""
    total, count = 0.0, 0
    for chunk in _batches(examples, micro):
        batch = {k: v.to(dist.device()) for k, v in collate(chunk, pad_id).items()}
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        at = batch["lm_targets"] != IGNORE
        logits = model.lm_logits(hidden[at]).float()
        total += float(torch.nn.functional.cross_entropy(logits, batch["lm_targets"][at], reduction="sum"))
        count += int(at.sum())
    return total, count


def evaluate(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer,
             sets: Optional[list[EvalSet]] = None) -> dict[str, dict]:
    """Metrics per task (on every rank). Collective: every rank calls it with the same sets."""
    sets = eval_sets(cfg, encoder) if sets is None else sets
    with inference(cfg, model):
        return {item.task.name: task_metrics(cfg, model, tokenizer, item) for item in sets}


def task_metrics(cfg: RunConfig, model: TaggedModel, tokenizer, item: EvalSet) -> dict:
    """One task's metrics over its held-out set, each rank scoring its shard. Collective."""
    rank, world, micro = dist.rank(), dist.world_size(), cfg.evaluation.micro_batch
    mine, real = shard(item.examples, rank, world)
    if item.task.loss == "head":
        preds = dist.all_gather_objects(head_predictions(model, mine, micro, tokenizer.pad_token_id)[:real])
        pred = [p for part in preds for p in part]
        target = [e.head_target[0] for e in item.examples]
        head = model.heads[model.head_names.index(item.task.head)]
        if head.spec.type == "regression":
            return regression_metrics([p[0] for p in pred], target)
        return classification_metrics([p[0] for p in pred], [int(t) for t in target])
    if item.task.loss == "target":
        texts = dist.all_gather_objects(generations(model, tokenizer, mine, micro, cfg.evaluation.max_new_tokens)[:real])
        hyps = [t for part in texts for t in part]
        refs = [fill(item.task.target, e.record).strip() for e in item.examples]
        return translation_metrics(hyps, refs) | {"examples": list(zip(hyps[:3], refs[:3]))}
    total, count = next_token_loss(model, mine, micro, tokenizer.pad_token_id)
    sums = dist.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64))
    loss = float(sums[0] / max(sums[1], 1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": int(sums[1])}


# ---------------------------------------------------------------------------------------------
# the closed-form linear probe baseline

@torch.no_grad()
def last_token_states(model: TaggedModel, examples: list[Example], micro: int, pad_id: int) -> np.ndarray:
    """Final normed hidden states at each example's head position (the last prompt token for a probe)."""
    rows = []
    for chunk in _batches(examples, micro):
        batch = {k: v.to(dist.device()) for k, v in collate(chunk, pad_id).items()}
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        rows.append(hidden[torch.arange(len(chunk)), batch["head_pos"]].float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, model.bank.hidden_size))


def all_states(model: TaggedModel, examples: list[Example], micro: int, pad_id: int) -> np.ndarray:
    """`last_token_states` of every example, in order, each rank computing its shard. Collective."""
    mine, real = shard(examples, dist.rank(), dist.world_size())
    return np.concatenate(dist.all_gather_objects(last_token_states(model, mine, micro, pad_id)[:real]))


def ridge_fit(features: np.ndarray, target: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """Ridge regression with the penalty chosen on a 20% hold-out of the training set, then refit on all."""
    mean, scale = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / scale
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, len(x) // 5)
    val, fit = order[:cut], order[cut:]

    def solve(rows: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
        xm, ym = x[rows].mean(0), target[rows].mean()
        xc = x[rows] - xm
        w = np.linalg.solve(xc.T @ xc + penalty * np.eye(x.shape[1]), xc.T @ (target[rows] - ym))
        return w, ym - xm @ w

    best = min((float(np.mean((x[val] @ w + b - target[val]) ** 2)), p)
               for p in 10.0 ** np.arange(-2, 6) for w, b in [solve(fit, p)])
    w, b = solve(np.arange(len(x)), best[1])
    return w / scale, b - (mean / scale) @ w


def probe_metrics(cfg: RunConfig, probe_model: TaggedModel, probe_encoder: Encoder, train_sets: list[EvalSet],
                  test_sets: list[EvalSet], pad_id: int) -> dict[str, dict]:
    """A ridge probe per head task on the frozen base's last prompt token (no tags). Collective."""
    results = {}
    micro = cfg.evaluation.micro_batch
    pairs = [(train, test) for train, test in zip(train_sets, test_sets) if train.task.loss == "head"]
    with inference(cfg, probe_model):  # one gather of the base for every task's features
        states = [[all_states(probe_model, item.examples, micro, pad_id) for item in pair] for pair in pairs]
    for (train_set, test_set), (x_train, x_test) in zip(pairs, states):
        w, b = ridge_fit(x_train, np.array([e.head_target[0] for e in train_set.examples]))
        results[test_set.task.name] = regression_metrics((x_test @ w + b).tolist(),
                                                         [e.head_target[0] for e in test_set.examples])
    return results


def start_heads_from_probe(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer,
                           train_examples: list[list[Example]], before: dict) -> dict:
    """Heads with `init: probe` start at the ridge fit on the hidden states at their function tag (initial tags)
    over the training set; their tasks' test metrics at that start join the baselines as "linear probe (start)".
    Collective; run once, on a fresh start (a resumed run reads its heads from the checkpoint)."""
    starting = [t for t in cfg.tags if t.head and t.head.init == "probe"]
    if not starting:
        return before
    examples = {tag.name: [e for task, items in zip(cfg.tasks, train_examples) if task.head == tag.name for e in items]
                for tag in starting}
    with inference(cfg, model):  # one gather of the base for every head's features
        features = {name: all_states(model, items, cfg.evaluation.micro_batch, tokenizer.pad_token_id)
                    for name, items in examples.items()}
    for tag in starting:  # heads are set outside: `set_trainable` gathers through ZeRO's own machinery
        head = model.heads[model.head_names.index(tag.name)]
        w, b = ridge_fit(features[tag.name], np.array([e.head_target[0] for e in examples[tag.name]]))
        mean, std = float(head.mean[0]), float(head.std[0])  # the head works in standardised label units
        dist.set_trainable(head.linear.weight, torch.tensor(w / std, dtype=torch.float32)[None])
        dist.set_trainable(head.linear.bias, torch.tensor([(b - mean) / std], dtype=torch.float32))
    if not cfg.evaluation.enabled:
        return before
    names = {t.name for t in starting}
    sets = [s for s in eval_sets(cfg, encoder) if s.task.head in names]
    out = {task: dict(models) for task, models in before.items()}
    for task, metrics in evaluate(cfg, model, encoder, tokenizer, sets).items():
        out.setdefault(task, {})["linear probe (start)"] = metrics
    save_baselines(cfg, out)
    return out


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """A plain-text table: one row per (task, model), the task's metrics as columns."""
    lines = []
    for task, by_model in results.items():
        metrics = [k for k in next(iter(by_model.values())) if k not in {"n", "examples", "tokens"}]
        lines.append(f"{task:<14} " + " ".join(f"{m:>10}" for m in metrics))
        for name, values in by_model.items():
            cells = " ".join(f"{values.get(m, float('nan')):>10.4f}" for m in metrics)
            lines.append(f"  {name:<12} {cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# a run's evaluation: the starting point and the probe before training, the trained model after

def baselines_path(cfg: RunConfig) -> Path:
    """Where a run keeps its before-training metrics, so that a resumed run reports the same ones."""
    return Path(cfg.output.dir) / "eval_baselines.json"


def save_baselines(cfg: RunConfig, results: dict[str, dict[str, dict]]) -> None:
    """Write the before-training metrics (rank 0)."""
    if dist.is_main():
        baselines_path(cfg).parent.mkdir(parents=True, exist_ok=True)
        baselines_path(cfg).write_text(json.dumps(results, indent=2))


def baselines(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer) -> dict[str, dict[str, dict]]:
    """Before training: the starting point (initial tags, untrained heads) and, for head tasks, the probe.

    Saved in the run folder so that a resumed run reports the same baselines. Collective.
    """
    path = baselines_path(cfg)
    if path.is_file():
        return json.loads(path.read_text())
    out: dict[str, dict[str, dict]] = {}
    sets = eval_sets(cfg, encoder)
    for item in sets:  # heads start at zero: before training each one predicts its training-label mean
        if item.task.loss == "head" and model.heads[model.head_names.index(item.task.head)].spec.type == "regression":
            head = model.heads[model.head_names.index(item.task.head)]
            target = [e.head_target[0] for e in item.examples]
            out[item.task.name] = {"initial": regression_metrics([float(head.mean[0])] * len(target), target)}
    for task, metrics in evaluate(cfg, model, encoder, tokenizer, [s for s in sets if s.task.name not in out]).items():
        out.setdefault(task, {})["initial"] = metrics
    if cfg.evaluation.baselines and any(t.loss == "head" for t in cfg.tasks):
        from tagscale.methods import apply_method

        probe_cfg = dataclasses.replace(cfg, method="linear_probe", tasks=[t for t in cfg.tasks if t.loss == "head"])
        probe_cfg = apply_method(probe_cfg, {})
        probe_encoder = Encoder(tokenizer, encoder.placeholders, set(), encoder.head_names, encoder.max_length)
        test = eval_sets(probe_cfg, probe_encoder)
        train = [EvalSet(t, i, encode_task(probe_encoder, t, i, read_records(t.train, t.name, "train"), "skip",
                                           t.name)[0])  for i, t in enumerate(probe_cfg.tasks) if t.train]
        for task, metrics in probe_metrics(probe_cfg, model, probe_encoder, train, test, tokenizer.pad_token_id).items():
            out.setdefault(task, {})["linear probe"] = metrics
    save_baselines(cfg, out)
    return out


def final(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer, before: dict) -> dict[str, dict[str, dict]]:
    """After training: the trained model beside the baselines; eval.json and a printed table (rank 0)."""
    out = {task: dict(models) for task, models in before.items()}
    for task, metrics in evaluate(cfg, model, encoder, tokenizer).items():
        out.setdefault(task, {})["trained"] = metrics
    if dist.is_main():
        (Path(cfg.output.dir) / "eval.json").write_text(json.dumps(out, indent=2))
        print(format_table(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Evaluate a finished run's tags and heads on its tasks' held-out sets (one process)."""
    import argparse

    from tagscale.config import RunConfig, build
    from tagscale.methods import apply_method
    from tagscale.runs import load_for_inference, read_run_json

    parser = argparse.ArgumentParser(prog="tagscale.evaluate", description=main.__doc__)
    parser.add_argument("--run", required=True, help="a complete run folder")
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    args = parser.parse_args(argv)
    folder = Path(args.run)
    meta = read_run_json(folder, "--run")
    recipe = build(RunConfig, {k: v for k, v in meta["config"].items() if k != "source"}, str(folder / "run.json"))
    recipe.source = str(folder / "run.json")
    recipe.evaluation.limit = args.limit or recipe.evaluation.limit
    cfg = apply_method(recipe, {name: info["p"] for name, info in meta["tags"].items()})
    model, base = load_for_inference([folder])
    encoder = Encoder(base.tokenizer, {s.name: model.bank.placeholder_ids(s.name) for s in model.bank.specs}, set(),
                      model.head_names, cfg.train.max_length)
    results = {task: {"trained": metrics} for task, metrics in evaluate(cfg, model, encoder, base.tokenizer).items()}
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def cli() -> None:
    from tagscale.errors import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
