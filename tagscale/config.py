"""The run configuration: typed dataclasses, one docstring per field, the range of each numeric setting, and the
checks across fields (`validate`), applied wherever a recipe is loaded.

Precedence: stage preset < recipe YAML < ``key=value`` overrides on the command line. Every mistake
is a `UserError` that names the recipe file, the dotted field and what was expected. Reading YAML, applying
overrides and converting plain data to these types is generic and lives in tagscale.config_io.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from tagscale import config_io
from tagscale.config_io import Range, apply_override, convert, merge, read_mapping
from tagscale.errors import UserError

TAG_NAME = re.compile(r"<[A-Za-z][A-Za-z0-9_\-]*>")
FIELD_KINDS = ("smiles", "protein")
"""What a task's `validate` can check a field for."""


@dataclass
class BaseConfig:
    """The frozen base model."""

    path: Optional[str] = None
    """A local Hugging Face causal-LM folder, or ``embedded:<name>`` (e.g. ``embedded:smollm2-135m``)."""
    preset: Optional[str] = None
    """A random-init shape preset instead of a folder (``tiny``, ``llama-7b``, ``llama-13b``, ``llama-70b`` ...)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights dtype; ``auto`` is bfloat16 on GPUs and float32 on CPU."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """Attention implementation passed to transformers."""
    activation_checkpointing: Literal["none", "reentrant", "nonreentrant"] = "none"
    """Recompute each decoder layer in backward to save activation memory."""
    seed: int = 0
    """Seed of the random init of shape presets."""


@dataclass
class HeadConfig:
    """A linear head on a function tag: reads the final normed hidden state at the tag's last vector."""

    type: Literal["regression", "classification"] = "regression"
    """Regression (MSE) or classification (cross-entropy)."""
    outputs: int = 1
    """Classes of a classification head; a regression head has exactly 1 (one label field per task)."""
    standardize: bool = True
    """Regression only: train on (y - mean) / std of the training labels; predictions are mapped back."""
    init: Literal["zero", "probe"] = "zero"
    """zero: the untrained head predicts the training-label mean (a classifier: class 0). probe: start from the
    closed-form ridge fit on the hidden states at the function tag (initial tags) over the training set (a
    classifier: ridge on one-hot classes as logits, scaled on validation), then tune tags and head together
    (linear probing, then fine-tuning): short runs start where the probe ends."""
    penalty: Literal["none", "probe"] = "none"
    """Regression heads with init: probe only. probe: training adds the ridge penalty the probe's validation chose
    (lambda * ||W||^2, lambda in the training loss's units, the bias free) to the head's loss, so the start is a
    stationary point of the training objective: without it the head's mean gradient at the start points from the
    ridge fit towards least squares, the fit validation rejected. Measured on QED x SmolLM2-135M, 60 steps of 8:
    no effect (that drift is a thousandth of a batch's gradient noise; docs/learning.md); it matters only when runs
    are long enough for the drift to add up. none: plain MSE."""
    fit: Literal["gradient", "closed_form", "crossfit"] = "gradient"
    """How the head is fitted while the tags train (init: probe only). gradient: the head is a trainable parameter
    (head_lr). closed_form (variable projection): no trainable head; every micro-batch solves ridge (the probe's
    penalty; a classifier: ridge on one-hot classes, as the probe) on a support set of every training record's
    features, refreshed with the current tags' features as batches pass, and the tags follow the exact
    leave-one-out residuals e_i / (1 - h_ii) of the batch's rows, gradients flowing through the features and the
    solve. crossfit: the head for a row is the ridge fit on the support's other `folds` (no gradient through it),
    so the residual the tags follow is out-of-sample. Both: a scored step uses the ridge fit on the whole support;
    the saved head is the ridge fit on every training record at the kept step (the start's head if it is step 0).
    tagscale/core/ridgehead.py; docs/learning.md says what each did."""
    folds: int = 5
    """fit: crossfit only: the number of folds of the training records (at least 2)."""


@dataclass
class TagConfig:
    """A tag trained by this run."""

    name: str = ""
    """Its name as written in templates, e.g. ``<Protein>``."""
    kind: Literal["domain", "function"] = "domain"
    """Domain tags give context before specialised data; function tags stand for a task."""
    p: int = 10
    """Number of vectors (of the base's hidden size)."""
    init: Literal["mean", "random", "text"] = "mean"
    """mean: the mean token embedding rescaled to the mean token norm (paper 3.1); random; text: embeddings of init_text."""
    init_text: Optional[str] = None
    """Text whose token embeddings initialise the tag (init: text), repeated or cut to p vectors."""
    head: Optional[HeadConfig] = None
    """A linear head (function tags only)."""


@dataclass
class DataConfig:
    """Where a task's examples come from: a JSONL/CSV file, or a built-in offline source."""

    path: Optional[str] = None
    """A .jsonl (one object per line) or .csv file whose fields the template names."""
    builtin: Optional[str] = None
    """A built-in offline source (tagscale.data.sources), e.g. ``qed``, ``translation``."""
    options: dict = field(default_factory=dict)
    """Options of the built-in source (sizes, languages ...)."""
    limit: Optional[int] = None
    """Use at most this many examples."""


@dataclass
class TaskConfig:
    """One task of the mixture: a template, its data, and what is learned from it."""

    name: str = ""
    """A short name for logs and metrics."""
    template: str = ""
    """The input, with tags (``<SMILES>``) and fields (``{smiles}``)."""
    target: Optional[str] = None
    """Text task: the target text template (cross-entropy on its tokens only)."""
    head: Optional[str] = None
    """Head task: the function tag whose head predicts ``label``."""
    label: Optional[str] = None
    """Head task: the field holding the number (regression) or class index (classification)."""
    weight: float = 1.0
    """Share of each global batch in a mixture."""
    validate: dict = field(default_factory=dict)
    """Fields of a file's records to check before training, each ``smiles`` or ``protein``: ``{smiles: smiles}``."""
    train: Optional[DataConfig] = field(default_factory=DataConfig)
    """Training examples; null makes an evaluation-only task (e.g. zero-shot: tags composed as never trained)."""
    eval: Optional[DataConfig] = None
    """Held-out test examples (default: the test split of a built-in train source), scored once, after training."""
    val: Optional[DataConfig] = None
    """Validation examples that select the kept step (default: the val part of a built-in source given
    `options.n_val`, else a seeded `train.val_fraction` of the training records, carved out before training; never
    the test split)."""

    @property
    def loss(self) -> str:
        """``head``, ``target`` (text task) or ``lm`` (next-token prediction on the template's text, stage 1)."""
        return "head" if self.head else "target" if self.target is not None else "lm"


@dataclass
class TrainConfig:
    """Optimisation and the loop."""

    steps: int = 100
    """Optimizer steps."""
    micro_batch: int = 4
    """Examples per rank per forward."""
    global_batch: int = 8
    """Examples per optimizer step over all ranks; accumulation = global / (micro x ranks)."""
    lr: float = 1e-3
    """Peak learning rate of the tags."""
    head_lr: Optional[float] = None
    """Peak learning rate of the heads (default: lr)."""
    weight_decay: float = 0.0
    """Weight decay (AdamW's decoupled decay; SGD's L2 term)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """The tags' and heads' optimizer. adamw: Adam's normalised steps (betas 0.9, 0.999). sgd: plain SGD with
    `momentum`: steps proportional to the gradient, where Adam moves every coordinate by about the rate whatever its
    gradient's size (docs/learning.md: what overshoots at 1e-4); it needs a much larger rate than AdamW."""
    momentum: float = 0.9
    """optimizer: sgd only: the momentum."""
    warmup_ratio: float = 0.03
    """Share of steps of linear warm-up."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    tag_reparam: Literal["none", "residual_mlp"] = "none"
    """How trained tags are parameterised. none: each tag's vectors are the parameter. residual_mlp (Residual Prompt
    Tuning, arXiv 2305.03937): vectors = tag + down(relu(up(tag))), the tag and a per-tag MLP of width
    `tag_reparam_width` trained together (an MLP of a fixed init alone could not separate init: mean's p equal
    vectors), `down` starting at zero so that training starts at the initial vectors;
    the MLP is folded into plain vectors when the run saves, so run folders, predict and composition are unchanged."""
    tag_reparam_width: int = 64
    """tag_reparam: residual_mlp only: the MLP's hidden width."""
    grad_clip: float = 0.0
    """Clip the global L2 norm of the trainables' gradient to this value before each optimizer step (DeepSpeed's
    ``gradient_clipping``; 0: off)."""
    seed: int = 0
    """Seed of data order and random tag init."""
    max_length: int = 512
    """Longest tokenized example."""
    too_long: Literal["skip", "error", "truncate"] = "skip"
    """An example longer than max_length: skip and count it, stop with an error, or (next-token tasks only;
    others are skipped) cut it to max_length."""
    padding_side: Literal["right", "left"] = "right"
    """Where padding goes (positions are computed from the attention mask, so both are exact). With the prefix
    split on, prefixes are padded on the left and the rest on the right, so `left` needs prefix_split: off."""
    prefix_split: Literal["auto", "on", "off"] = "auto"
    """Run the frozen prefix before the first trainable tag once without autograd (exact; auto: on in stages 2-3)."""
    log_every: int = 1
    """Log metrics every N steps."""
    eval_every: int = 0
    """Score the validation sets every N steps, besides the start (step 0) and the last step, which are always
    scored (0: only those two). The run keeps, saves and tests the trainables of the best-scoring step."""
    selection: Literal["beyond_noise", "best"] = "beyond_noise"
    """Which scored step the run keeps. beyond_noise: the best-scoring of the start and the steps whose validation
    gain over the start is beyond its 95% paired-bootstrap interval (resampling the validation examples), so that
    a gain a few dozen validation examples cannot tell from noise does not replace the start; best: the
    best-scoring step, whatever the noise."""
    val_fraction: float = 0.1
    """Share of each trained task's training records held out for validation when the task gives no ``val``
    data (seeded by train.seed; 0: no validation, the last step is kept)."""
    val_limit: int = 200
    """At most this many validation examples per task (text tasks are scored by greedy generation: keep it small)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only on a signal)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept."""
    resume: str = "auto"
    """auto: resume from the newest complete checkpoint in the output folder; never; or a checkpoint path."""


@dataclass
class EvalConfig:
    """Evaluation after training (every rank evaluates its shard; results are reduced)."""

    enabled: bool = True
    """Evaluate the tasks' held-out sets at the end of the run (writes eval.json)."""
    baselines: bool = True
    """Also score the run's starting point (initial tags, untrained heads) and a closed-form linear probe."""
    micro_batch: int = 8
    """Examples per forward or generate call."""
    max_new_tokens: int = 64
    """Longest generated answer (greedy decoding) for text tasks."""
    gather_base: Literal["auto", "always", "never"] = "auto"
    """Under ZeRO-3, gather the whole base once on every rank for evaluation (its forwards, the probe's, greedy
    decoding), instead of each layer again on every forward. `auto`: when it fits in half of every rank's free memory."""
    limit: Optional[int] = None
    """Evaluate at most this many examples per task."""
    bootstrap: int = 1000
    """Resamples of the test examples behind every 95% confidence interval (0: no intervals)."""


@dataclass
class OutputConfig:
    """The run folder."""

    dir: str = "runs/default"
    """Tags, heads, run.json, metrics.jsonl and checkpoints go here."""


@dataclass
class WandbConfig:
    """Experiment tracking (rank 0 only)."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline writes under the run folder; online needs network access."""
    project: str = "tagscale"
    """Project name."""
    system_stats: bool = True
    """Let wandb sample system metrics (GPU use, memory) in a side process; off spares the CPU of small machines."""


@dataclass
class RunConfig:
    """A whole run: one stage of Tag-LLM."""

    stage: Literal[1, 2, 3] = 1
    """1: domain tags (next-token); 2: single-domain function tags; 3: cross-domain function tags."""
    enrich: bool = False
    """Stages 2-3: keep the domain tags of earlier runs trainable too ("enrichment")."""
    method: Literal["tag_llm", "prompt_tuning", "linear_probe", "expert"] = "tag_llm"
    """tag_llm: domain + function tags + heads; the baselines on the same recipe, data and budget (stages 2-3):
    prompt_tuning: one randomly initialised prefix prompt as long as all the recipe's tags together, the heads
    reading the last prompt token; linear_probe: only the heads, on the frozen base at the last prompt token;
    expert: no LLM at all, scikit-learn models on RDKit / amino-acid features of the template's fields, the model
    and its hyperparameters chosen on the same validation split (tagscale.study.expert, docs/expert.md)."""
    base: BaseConfig = field(default_factory=BaseConfig)
    """The frozen base."""
    tags: list[TagConfig] = field(default_factory=list)
    """Tags trained by this run (tags of earlier runs come from from_runs)."""
    from_runs: list[str] = field(default_factory=list)
    """Earlier run folders whose tags this run uses (later folders win)."""
    transfer_tags: bool = False
    """Use from_runs' tags on a base other than the one they were trained on (same hidden size): a deliberate
    transfer, said in the log. Off: such a base is refused (run.json's base identity is compared in full)."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """The task mixture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation after training."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """The run folder."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Tracking."""
    source: str = "<config>"
    """The recipe file the config came from (set by the loader; used in messages)."""

    @property
    def trained_kind(self) -> str:
        """The tag kind a stage trains: domain in stage 1, function in stages 2-3."""
        return "domain" if self.stage == 1 else "function"

    @property
    def use_prefix_split(self) -> bool:
        """The exact prefix split is on where asked, or by default where everything before the function tag is frozen;
        never under activation checkpointing (which recomputes the whole forward in backward: nothing to save)."""
        if self.base.activation_checkpointing != "none":
            return False
        if self.train.prefix_split == "auto":
            return self.stage >= 2 and not self.enrich
        return self.train.prefix_split == "on"

    def tag(self, name: str) -> Optional[TagConfig]:
        """The trained tag of that name, if this run trains it."""
        return next((t for t in self.tags if t.name == name), None)

    def to_dict(self) -> dict:
        """The fully resolved config as plain data."""
        return dataclasses.asdict(self)


# Each stage is a preset of the same config: defaults that the recipe and the command line override.
STAGE_PRESETS: dict[int, dict] = {
    1: {"train": {"lr": 1e-3, "prefix_split": "off"}},
    2: {"train": {"lr": 1e-3}},
    3: {"train": {"lr": 1e-3}},
}


# ----------------------------------------------------------------------------------------------
# The range of each numeric setting, and typed config built with it (tagscale.config_io converts).

POSITIVE_INT = Range(1, what="a positive integer")
NON_NEGATIVE = Range()
FRACTION = Range(0, high=1, what="a value in [0, 1)")
RANGES: dict[tuple[str, str], Range] = {
    ("BaseConfig", "seed"): NON_NEGATIVE,  # numpy's seeds are non-negative
    ("TagConfig", "p"): Range(1, what="a positive number of vectors"),
    ("HeadConfig", "outputs"): POSITIVE_INT,
    ("DataConfig", "limit"): POSITIVE_INT,
    ("TaskConfig", "weight"): Range(0, low_open=True, what="a positive weight"),
    **{("TrainConfig", name): POSITIVE_INT for name in ("steps", "micro_batch", "global_batch", "max_length",
                                                         "log_every", "val_limit")},
    ("TrainConfig", "lr"): Range(0, low_open=True, what="a positive learning rate"),
    ("TrainConfig", "head_lr"): Range(0, low_open=True, what="a positive learning rate"),
    ("TrainConfig", "grad_clip"): Range(what="0 (off) or a positive norm"),
    ("TrainConfig", "warmup_ratio"): FRACTION,
    ("TrainConfig", "val_fraction"): FRACTION,
    ("TrainConfig", "momentum"): FRACTION,
    ("TrainConfig", "tag_reparam_width"): Range(1, what="a positive width"),
    **{("EvalConfig", name): POSITIVE_INT for name in ("micro_batch", "max_new_tokens", "limit")},
}
"""The range of each numeric setting, checked wherever a config is built (a recipe, an override, a run.json).
A numeric setting not listed here is 0 or more (NON_NEGATIVE), which is what most counts, rates and sizes mean."""


def check_range(cls: type, key: str, value: Any, where: str, source: str) -> None:
    """A numeric setting's value is in its range (RANGES); one line naming the field otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        RANGES.get((cls.__name__, key), NON_NEGATIVE).check(value, where, source)


def check_option(value: Any, tp: Any, where: str) -> Any:
    """A built-in source's option (typed by its signature) as that type, finite and 0 or more where a number; a
    message without the file, which the caller puts in front."""
    try:
        value = convert(value, tp, where, "", check_range)
        check_range(type(None), where, value, where, "")
    except UserError as err:
        raise UserError(str(err).removeprefix(": ")) from None
    return value


def build(cls: type, data: dict, source: str = "<config>", prefix: str = "") -> Any:
    """Make config section `cls` from a mapping; unknown keys, wrong types and values out of their range (RANGES)
    are UserErrors naming the field."""
    return config_io.build(cls, data, source, prefix, check_range)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe, put it over its stage preset, apply ``key=value`` overrides, validate."""
    path = Path(path)
    data = read_mapping(path)
    if overrides:  # the recipe alone first: a key or value that fails only after the overrides is theirs
        build_recipe(data, str(path))
        for text in overrides:
            apply_override(data, text)
    cfg = build_recipe(data, "command line" if overrides else str(path))
    cfg.source = str(path)
    validate(cfg)
    return cfg


def build_recipe(data: dict, source: str) -> RunConfig:
    """A recipe's mapping over its stage's preset, typed; `source` names who wrote it (a file, the command line)."""
    stage = data.get("stage", 1)
    if stage not in STAGE_PRESETS:
        raise UserError(f"{source}: stage: expected 1, 2 or 3, got {stage!r}")
    return build(RunConfig, merge(STAGE_PRESETS[stage], data), source)


def validate(cfg: RunConfig) -> None:
    """Check what the types alone cannot; each problem names the field and the fix. The checks run in this order,
    so that a recipe with several problems is told the first of them."""
    _check_base(cfg)
    seen: set[str] = set()
    for i, tag in enumerate(cfg.tags):
        _check_tag(cfg, f"{cfg.source}: tags[{i}]", tag, seen)
    _check_method(cfg)
    names: set[str] = set()
    for i, task in enumerate(cfg.tasks):
        _check_task(cfg, f"{cfg.source}: tasks[{i}]", task, names)
    _check_batches(cfg)


def _check_base(cfg: RunConfig) -> None:
    if (cfg.base.path is None) == (cfg.base.preset is None):
        raise UserError(f"{cfg.source}: base: set exactly one of base.path (a local model folder) and base.preset (a random-init shape)")


def _check_tag(cfg: RunConfig, where: str, tag: TagConfig, seen: set[str]) -> None:
    """One trained tag: its name (unique, adds it to `seen`), its head, its init and its kind for this stage."""
    if not TAG_NAME.fullmatch(tag.name):
        raise UserError(f"{where}.name: expected a name like <Protein>, got {tag.name!r}")
    if tag.name in seen:
        raise UserError(f"{where}.name: {tag.name} is defined twice")
    seen.add(tag.name)
    if tag.head:
        _check_head(where, tag)
    if tag.init == "text" and not tag.init_text:
        raise UserError(f"{where}.init_text: init: text needs the text whose embeddings start the tag")
    if tag.kind != cfg.trained_kind and not (cfg.enrich and tag.kind == "domain"):
        maker = "stage 1" if tag.kind == "domain" else "stage 2 or 3"
        raise UserError(f"{where}: stage {cfg.stage} trains {cfg.trained_kind} tags; {tag.name} is a "
                        f"{tag.kind} tag, which {maker} makes (or set enrich: true in stages 2-3)")


def _check_head(where: str, tag: TagConfig) -> None:
    """A tag's head: only on a function tag, and a type, outputs, start, penalty and fit that go together."""
    head = tag.head
    if tag.kind != "function":
        raise UserError(f"{where}.head: only function tags carry heads; {tag.name} is a {tag.kind} tag")
    if head.type == "regression" and head.outputs != 1:
        # a record carries one number in `label`; more outputs would train on collation's zero padding
        raise UserError(f"{where}.head.outputs: a regression head predicts one number (the task's label "
                        f"field); got {head.outputs} (make one task and head per label)")
    if head.type == "classification" and head.outputs < 2:
        raise UserError(f"{where}.head.outputs: a classification head needs at least 2 classes")
    if head.penalty == "probe" and (head.type != "regression" or head.init != "probe"):
        # the classifier start (one-hot ridge scaled on validation) minimises no penalised cross-entropy
        raise UserError(f"{where}.head.penalty: probe keeps a ridge probe's penalty; it needs type: regression "
                        f"and init: probe (got type: {head.type}, init: {head.init})")
    if head.fit != "gradient" and head.init != "probe":
        raise UserError(f"{where}.head.fit: {head.fit} solves the head from the probe's ridge fit; it needs "
                        f"init: probe (got init: {head.init})")
    if head.fit != "gradient" and head.penalty != "none":
        raise UserError(f"{where}.head.penalty: the closed-form head carries the probe's penalty in its solve; "
                        f"drop penalty: {head.penalty} or set fit: gradient")
    if head.folds < 2:
        raise UserError(f"{where}.head.folds: expected at least 2 folds, got {head.folds}")


def _check_method(cfg: RunConfig) -> None:
    """At least one task, and a method that fits the stage and the tasks."""
    src = cfg.source
    if not cfg.tasks:
        raise UserError(f"{src}: tasks: expected at least one task")
    if cfg.method != "tag_llm" and cfg.stage == 1:
        raise UserError(f"{src}: method: {cfg.method} is a baseline for stages 2-3; stage 1 trains domain tags (tag_llm)")
    if cfg.method == "linear_probe" and any(t.loss != "head" for t in cfg.tasks):
        raise UserError(f"{src}: method: linear_probe trains only heads; every task needs a head (label) task")
    if cfg.method == "linear_probe" and any(t.head and t.head.fit != "gradient" for t in cfg.tags):
        raise UserError(f"{src}: method: linear_probe trains only its heads; a closed-form head (head.fit) would leave "
                        f"it nothing to train: its probe start is already that solution (set head.fit: gradient)")
    for i, task in enumerate(cfg.tasks if cfg.method == "expert" else []):
        where = f"{src}: tasks[{i}] ({task.name})"  # the features of its fields: data.fields.check_expert_tasks
        if task.loss != "head":
            raise UserError(f"{where}: method: expert fits a model to a head task's label; this is a "
                            f"{'text (target)' if task.loss == 'target' else 'next-token'} task, which it cannot do")
        if task.train is None:
            raise UserError(f"{where}: method: expert needs training data; this task is evaluation-only (train: null)")


def _check_task(cfg: RunConfig, where: str, task: TaskConfig, names: set[str]) -> None:
    """One task: its name (unique, adds it to `names`), template, head or target, field checks and data."""
    if not task.name:
        raise UserError(f"{where}.name: expected a short task name")
    if task.name in names:
        raise UserError(f"{where}.name: task {task.name!r} is defined twice")
    names.add(task.name)
    if not task.template.strip():
        raise UserError(f"{where}.template: expected an input template")
    if task.head and task.target is not None:
        raise UserError(f"{where}: set head (a numeric task) or target (a text task), not both")
    if task.head:
        tag = cfg.tag(task.head)
        if tag is None or tag.head is None:
            raise UserError(f"{where}.head: {task.head} must be a function tag with a head trained in this run")
        if task.head not in task.template:
            raise UserError(f"{where}.template: a head task must contain its function tag {task.head}")
        if not task.label:
            raise UserError(f"{where}.label: a head task needs the field that holds its label")
    for name, kind in task.validate.items():
        if kind not in FIELD_KINDS:
            raise UserError(f"{where}.validate.{name}: expected {' or '.join(FIELD_KINDS)}, got {kind!r}")
    _check_task_data(where, task)


def _check_task_data(where: str, task: TaskConfig) -> None:
    """Where a task's training, test and validation examples come from."""
    if task.train is None and task.eval is None:
        raise UserError(f"{where}: an evaluation-only task (train: null) needs eval data")
    if task.train is not None and (task.train.path is None) == (task.train.builtin is None):
        raise UserError(f"{where}.train: set exactly one of path (a .jsonl/.csv file) and builtin")
    if task.eval is not None and task.eval.path is not None and task.eval.builtin is not None:
        raise UserError(f"{where}.eval: set one of path and builtin, not both")
    if task.val is not None and task.train is None:
        raise UserError(f"{where}.val: an evaluation-only task (train: null) is not validated; drop val")
    if task.val is not None and (task.val.path is None or task.val.builtin is not None):
        raise UserError(f"{where}.val: expected a path (a .jsonl/.csv file); a built-in source's validation "
                        f"is carved from its training split by train.val_fraction")


def _check_batches(cfg: RunConfig) -> None:
    """Batch sizes that hold every trained task, and a padding side the prefix split honours."""
    src, t = cfg.source, cfg.train
    if t.global_batch % t.micro_batch:
        raise UserError(f"{src}: train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch ({t.micro_batch})")
    if not any(task.train is not None for task in cfg.tasks):
        raise UserError(f"{src}: tasks: expected at least one task with training data")
    trained = sum(task.train is not None for task in cfg.tasks)
    if trained > t.global_batch:
        raise UserError(f"{src}: train.global_batch ({t.global_batch}) must hold at least one example of each of the {trained} trained tasks")
    if t.padding_side == "left" and cfg.use_prefix_split:
        raise UserError(f"{src}: train.padding_side: left is not honoured while the prefix split is on (train.prefix_split: "
                        f"{t.prefix_split}, stage {cfg.stage}): it pads each prefix on the left and the rest on the right; "
                        f"set train.prefix_split: off to pad on the left")


def grad_accumulation(cfg: RunConfig, world_size: int) -> int:
    """Accumulation steps so that micro x accumulation x ranks = global batch; a contradiction names the numbers."""
    t = cfg.train
    per_step = t.micro_batch * world_size
    if t.global_batch % per_step:
        raise UserError(f"{cfg.source}: train.global_batch ({t.global_batch}) is not a multiple of train.micro_batch "
                        f"({t.micro_batch}) x ranks ({world_size}) = {per_step}")
    return t.global_batch // per_step
