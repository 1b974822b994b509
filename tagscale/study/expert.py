"""The expert baseline (`method: expert`): scikit-learn models on hand-made features of the inputs, no LLM at all.

The bar a frozen LLM with tags must clear before "beats the experts" means anything. Same recipe, data, splits,
validation, metrics and intervals as the other methods:

- features of each field the task's template names: a SMILES field (`{smiles}`, `{smiles1}` ... or one the task's
  `validate` marks `smiles`) gives every RDKit descriptor (`Descriptors.CalcMolDescriptors`, rdkit's own list)
  and a 2048-bit Morgan fingerprint (radius 2, `rdFingerprintGenerator`); a protein field (`{seq}`, `{sequence}`,
  `{protein}` ... or marked `protein`) gives the amino-acid composition (20 fractions) and the dipeptide (k = 2)
  composition (400 counts divided by the number of dipeptides). Several fields are concatenated in template order.
- candidates: a random forest over a small grid and a ridge (regression) or logistic regression (classification)
  over a grid of penalties, all with fixed seeds (`candidates`);
- each candidate is fitted on the run's training part and scored on its validation part (`train.val_fraction`,
  the same rows `data.validation_split` holds out for the LLM methods) by the task's primary metric
  (`metrics.PRIMARY`: MSE, accuracy); the best (ties: the earlier candidate) is the one tested, once, on the test
  split. The test split never chooses anything.

scikit-learn is imported here only, and only inside functions. The task check that runs before a run starts
(`tagscale.data.fields.check_expert_tasks`) needs neither it nor torch.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tagscale.config import RunConfig, TaskConfig
from tagscale.data.fields import field_kinds, label_value
from tagscale.errors import UserError
from tagscale.runtime.runfolder import (mark_running, nothing_to_do, take_output_folder, write_json_atomic,
                                        write_run_json)

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
MORGAN_RADIUS, MORGAN_BITS = 2, 2048
CLIP = 10.0
"""Linear models see standardised features clipped to +-CLIP: a few RDKit descriptors (Ipc, BCUT on odd atoms) take
values many orders beyond the training range, which would swing a linear prediction without bound."""


# ---------------------------------------------------------------------------------------------------- the tasks







# ---------------------------------------------------------------------------------------------------- features

def descriptor_names() -> list[str]:
    """RDKit's descriptor list, in its own order (the columns of `molecule_features` before the fingerprint)."""
    from rdkit.Chem import Descriptors

    return [name for name, _ in Descriptors._descList]


def molecule_features(smiles: list[str], where: str = "smiles") -> np.ndarray:
    """(n, descriptors + 2048): every RDKit descriptor (non-finite values as NaN) and the radius-2 Morgan bits."""
    from rdkit.Chem import Descriptors, rdFingerprintGenerator

    from tagscale.data.builtin.common import parse_smiles

    names = descriptor_names()
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=MORGAN_RADIUS, fpSize=MORGAN_BITS)
    rows = np.empty((len(smiles), len(names) + MORGAN_BITS))
    for i, text in enumerate(smiles):
        mol = parse_smiles(text, f"{where} row {i + 1}")
        values = Descriptors.CalcMolDescriptors(mol)
        rows[i, :len(names)] = [values[name] for name in names]
        rows[i, len(names):] = generator.GetFingerprintAsNumPy(mol)
    rows[~np.isfinite(rows)] = np.nan
    return rows


def protein_features(seqs: list[str]) -> np.ndarray:
    """(n, 20 + 400): amino-acid composition (count / length) and dipeptide composition (count / (length - 1));
    residues outside the 20 standard ones count in the length but in no column."""
    index = {aa: j for j, aa in enumerate(AMINO_ACIDS)}
    rows = np.zeros((len(seqs), 20 + 400))
    for i, seq in enumerate(seqs):
        seq = str(seq).strip().upper()
        for aa in seq:
            if aa in index:
                rows[i, index[aa]] += 1
        for a, b in zip(seq, seq[1:]):
            if a in index and b in index:
                rows[i, 20 + 20 * index[a] + index[b]] += 1
        rows[i, :20] /= max(len(seq), 1)
        rows[i, 20:] /= max(len(seq) - 1, 1)
    return rows


def task_features(task: TaskConfig, records: list[dict], where: str) -> np.ndarray:
    """The concatenated features of every field of the task's template."""
    parts = []
    for name, kind in field_kinds(task):
        missing = next((r for r in records if name not in r), None)
        if missing is not None:
            from tagscale.data.records import record_where

            raise UserError(f"{record_where(missing)}: field {name!r} (named by task {task.name!r}) is missing")
        values = [str(r[name]) for r in records]
        parts.append(molecule_features(values, f"{where} field {name}") if kind == "smiles" else protein_features(values))
    return np.concatenate(parts, axis=1)


# ---------------------------------------------------------------------------------------------------- models

def candidates(kind: str, seed: int) -> list[tuple[str, dict]]:
    """(family, hyperparameters) in the fixed order of the validation choice (ties keep the earlier one): a random
    forest (300 trees; features tried per split and leaf size over a grid) and a ridge / logistic regression over
    a grid of penalties. A forest, not gradient boosting: scikit-learn's histogram boosting spent ~0.2 s per
    iteration on 2,265 features on the shared 2-core development machine (50-65 s per fit on 80 molecules); a
    forest fit in 5-12 s on 763."""
    trees = [("random_forest", {"n_estimators": 300, "max_features": features, "min_samples_leaf": leaf,
                                "random_state": seed})
             for features in ("sqrt", 0.2) for leaf in (1, 3)]
    if kind == "regression":
        return trees + [("ridge", {"alpha": alpha}) for alpha in (0.1, 1.0, 10.0, 100.0, 1000.0)]
    return trees + [("logistic_regression", {"C": c, "max_iter": 2000, "random_state": seed})
                    for c in (0.01, 0.1, 1.0, 10.0)]


def make_model(kind: str, family: str, params: dict):
    """An unfitted scikit-learn estimator behind a median imputer (a descriptor RDKit cannot compute is NaN).
    Linear models also standardise and clip (`CLIP`); trees need no scaling. One job: deterministic, and polite
    on a shared machine."""
    from functools import partial

    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    impute = SimpleImputer(strategy="median", keep_empty_features=True)
    if family == "random_forest":
        forest = RandomForestRegressor if kind == "regression" else RandomForestClassifier
        return make_pipeline(impute, forest(n_jobs=1, **params))
    linear = {"ridge": Ridge, "logistic_regression": LogisticRegression}[family](**params)
    return make_pipeline(impute, StandardScaler(), FunctionTransformer(partial(np.clip, a_min=-CLIP, a_max=CLIP)),
                         linear)


def predict(kind: str, model, x: np.ndarray) -> tuple[list, Optional[list]]:
    """Predictions in label units (class indices for classification) and, for a binary classifier, the
    positive-class probability (the score ROC-AUC ranks)."""
    if kind == "regression":
        return [float(v) for v in model.predict(x)], None
    labels = [int(v) for v in model.predict(x)]
    classes = list(model.classes_)
    scores = [float(p) for p in model.predict_proba(x)[:, classes.index(1)]] if classes == [0, 1] else None
    return labels, scores


def metric_fn(kind: str):
    """The metric function of a head kind (classification adds ROC-AUC when given a third column of scores)."""
    from tagscale.metrics import classification_metrics, regression_metrics

    return regression_metrics if kind == "regression" else classification_metrics


def select(kind: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
           seed: int = 0) -> tuple[dict, Any, list[dict]]:
    """Fit every candidate on the training rows, score it on the validation rows by the primary metric, keep the
    best. Returns (the choice, its fitted model, every candidate's validation record)."""
    from tagscale.metrics import PRIMARY

    metric, higher = PRIMARY[kind]
    fn = metric_fn(kind)
    best, best_model, records = None, None, []
    for j, (family, params) in enumerate(candidates(kind, seed)):
        model = make_model(kind, family, params)
        started = time.perf_counter()
        model.fit(x_train, y_train)
        value = float(fn(predict(kind, model, x_val)[0], list(y_val))[metric])
        records.append({"candidate": j, "family": family, "params": params, metric: value,
                        "fit_s": round(time.perf_counter() - started, 2)})
        better = best is None or (value > best["value"] if higher else value < best["value"])
        if math.isfinite(value) and better:
            best = {"candidate": j, "family": family, "params": params, "metric": metric, "value": value}
            best_model = model
    if best is None:
        raise UserError("method: expert: no candidate gave a finite validation score")
    return best, best_model, records


# ---------------------------------------------------------------------------------------------------- the run

def _head_of(cfg: RunConfig, task: TaskConfig):
    return cfg.tag(task.head).head


def run(cfg: RunConfig) -> int:
    """An expert run, in a run folder held and written as the trainer's (`take_output_folder`, `mark_running`,
    `write_run_json`): for each task, features, the validated choice, the test metrics with 95% intervals; writes
    run.json (the choice as `selection`), metrics.jsonl (every candidate's validation score) and eval.json (the
    per-task structure the other methods write: `initial` = the training-label mean, or majority class, and
    `trained` = the chosen model)."""
    if int(os.environ.get("RANK", "0")) != 0:  # under a multi-rank launcher (Slurm, deepspeed) one process is enough
        return 0
    lock, done = take_output_folder(cfg)
    try:
        if done:
            return nothing_to_do(cfg)
        mark_running(cfg)
        return fit_and_score(cfg)
    finally:
        lock.release()


def fit_and_score(cfg: RunConfig) -> int:
    """The expert run itself, in an output folder it holds: see `run`."""
    import sklearn
    from rdkit import __version__ as rdkit_version

    from tagscale.eval.tables import format_table
    from tagscale.metrics import to_json

    folder = Path(cfg.output.dir)
    started = time.perf_counter()
    lines, results, selection, described = [], {}, {}, {}
    for i, task in enumerate(cfg.tasks):
        results[task.name], selection[task.name], described[task.name], tried = fit_task(cfg, i, task)
        lines += tried
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(to_json(line) + "\n" for line in lines))
    write_json_atomic(folder / "eval.json", results)
    heads = {t.name: {"type": t.head.type, "outputs": t.head.outputs} for t in cfg.tags if t.head is not None}
    meta = {"status": "complete", "stage": cfg.stage, "step": 0, "tags": {}, "heads": heads,
            "hidden_size": None, "base": {"source": "none (method: expert uses no LLM)", "num_parameters": 0},
            "config": cfg.to_dict(), "trainable_parameters": 0, "world_size": 1,
            "selection": {"tasks": selection, "rule": "per task: the candidate with the best validation "
                                                      + ", ".join(sorted({c["metric"] for c in selection.values()}))},
            "expert": {"tasks": described, "sklearn": sklearn.__version__, "rdkit": rdkit_version,
                       "seconds": round(time.perf_counter() - started, 1)}}
    write_run_json(folder, meta)  # last: 'complete' means the rest is there
    shown = {task: {("mean / majority (initial)" if k == "initial" else "expert"): v for k, v in by.items()}
             for task, by in results.items()}
    print(format_table(shown), flush=True)
    return 0


def task_splits(cfg: RunConfig, i: int, task: TaskConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Task i's training, validation and test records, as the trainer splits them (validation is required: the
    expert chooses its model on it)."""
    from tagscale.data.records import read_records
    from tagscale.data.train_data import task_records
    from tagscale.eval.sets import held_out_data

    train_records, val_records = task_records(cfg, i)
    if not val_records:
        raise UserError(f"{cfg.source}: tasks[{i}] ({task.name}): method: expert chooses its model on validation "
                        f"data; set train.val_fraction above 0 or give tasks[{i}].val")
    test_records = read_records(held_out_data(task), f"{cfg.source}: tasks[{i}].eval", "test")
    if cfg.evaluation.limit is not None:
        test_records = test_records[:cfg.evaluation.limit]
    return train_records, val_records, test_records


def trivial_predictions(kind: str, y_train: np.ndarray, n: int, with_scores: bool) -> tuple[list, Optional[list]]:
    """The `initial` row: the training-label mean (regression) or majority class, with the positive rate as the
    score where the chosen model gives scores."""
    if kind == "regression":
        return [float(np.mean(y_train))] * n, None
    values, counts = np.unique(y_train, return_counts=True)
    majority = int(values[np.argmax(counts)])  # ties: the smaller class index
    return [majority] * n, ([float(np.mean(y_train == 1))] * n if with_scores else None)


def fit_task(cfg: RunConfig, i: int, task: TaskConfig) -> tuple[dict, dict, dict, list[dict]]:
    """Task i: features, the model chosen on validation, its test metrics with 95% intervals beside the trivial
    predictor's. Returns (eval.json's entry, the choice, what was described of the features, metrics.jsonl lines)."""
    from tagscale.metrics import PRIMARY, with_intervals

    kind = _head_of(cfg, task).type
    label = (lambda r: int(label_value(r, task))) if kind == "classification" else (lambda r: label_value(r, task))
    parts = dict(zip(("train", "val", "test"), task_splits(cfg, i, task)))
    x = {part: task_features(task, recs, f"{cfg.source}: tasks[{i}].{part}") for part, recs in parts.items()}
    y = {part: np.array([label(r) for r in recs]) for part, recs in parts.items()}
    choice, model, tried = select(kind, x["train"], y["train"], x["val"], y["val"], cfg.train.seed)
    metric = PRIMARY[kind][0]
    lines = [{"task": task.name, **{k: v for k, v in record.items() if k != metric},
              f"val/{task.name}/{metric}": record[metric], "chosen": record["candidate"] == choice["candidate"]}
             for record in tried]
    outputs, scores = predict(kind, model, x["test"])
    targets = [label(r) for r in parts["test"]]
    scored = {}
    for name, (out, sc) in (("initial", trivial_predictions(kind, y["train"], len(targets), scores is not None)),
                            ("trained", (outputs, scores))):
        columns = (out, targets) + ((sc,) if sc is not None else ())
        scored[name] = with_intervals(metric_fn(kind), *columns, resamples=cfg.evaluation.bootstrap) \
            | {"targets": targets, "outputs": out}
        if sc is not None:
            scored[name]["scores"] = sc
    chosen = choice | {"val_examples": len(parts["val"]), "train_examples": len(parts["train"]),
                       "candidates": len(tried),
                       "rule": f"validation {choice['metric']} of each candidate fitted on the training part"}
    scored["trained"]["selected"] = chosen
    described = {"fields": [list(f) for f in field_kinds(task)], "features": int(x["train"].shape[1])}
    return scored, chosen, described, lines
