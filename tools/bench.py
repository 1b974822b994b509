"""Benchmark: tagscale's training step against the plain model and HF PEFT prompt tuning, side by side.

    python tools/bench.py                              # SmolLM2-135M (embedded), fp32, batch 8, 120-token prefix
    python tools/bench.py --base preset:tiny --repeats 3 --out /tmp/bench.json
    python tools/bench.py --device cuda                # on the GPU (tools/gpu_check.py's `peft` part)

Same base, same batches, one process. Each measured step is forward + backward + AdamW on the trainables; after
a warm-up the candidates run interleaved (A B C A B C ...) so background load hits them alike, and the median is
reported. Ratios, not absolute times, are the result: they carry over between machines far better.
Activation memory is the bytes autograd saves for backward (counted with saved-tensor hooks, device independent).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tagscale.runtime.distributed import dist  # noqa: E402
from tagscale.runtime.bases import load_base  # noqa: E402
from tagscale.config import BaseConfig  # noqa: E402
from tagscale.data.batches import collate, micro_batches, to_device  # noqa: E402
from tagscale.data.encode import Example  # noqa: E402
from tagscale.eval.inference import batches_by_length  # noqa: E402
from tagscale.errors import UserError, run_cli  # noqa: E402
from tagscale.core.model import IGNORE, HeadSpec, TaggedModel  # noqa: E402
from tagscale.core.tags import TagBank, TagSpec  # noqa: E402


def saved_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during `step`'s forward (distinct storages counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def peak_flops() -> tuple[float, str]:
    """Dense matmul FLOP/s this device reaches (the MFU denominator), and how it was obtained."""
    if torch.cuda.is_available():
        from tagscale.study.devices import card_peak_flops  # the one card -> peak table

        name = torch.cuda.get_device_name()
        if card_peak_flops(name):
            return card_peak_flops(name), f"{name} dense bf16 peak"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start), "measured fp32 1024^3 matmul on this CPU"


def on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated (CPU) batch on the device the candidates' models live on."""
    return to_device(batch, dist.device())


class Candidates:
    """The steps compared: tagscale (hooks, prefix split), hand-built inputs_embeds, PEFT prompt tuning."""

    def __init__(self, base, p: int, batch: int, prefix: int, seed: int = 0):
        self.base = base
        rng = np.random.default_rng(seed)
        vocab = min(len(base.tokenizer), base.identity["embedding_rows"]) - 1
        hidden, rows = base.identity["hidden_size"], base.identity["embedding_rows"]
        specs = [TagSpec("<Domain>", "domain", p, False), TagSpec("<Task>", "function", p, True)]
        self.bank = TagBank(specs, hidden, rows)
        with torch.no_grad():
            for s in specs:
                self.bank.param(s.name).normal_(0, 0.02)
        self.model = TaggedModel(base.model, self.bank, [HeadSpec("<Task>", "regression", 1)], uses_lm_head=True)
        torch.nn.init.normal_(self.model.heads[0].linear.weight, std=0.02)
        dist.place(self.model)  # on dist.device(), where every batch below goes
        dom, fun = self.bank.placeholder_ids("<Domain>"), self.bank.placeholder_ids("<Task>")
        self.head_examples, self.text_examples = [], []
        for i in range(batch):
            n = int(prefix + rng.integers(-prefix // 10, prefix // 10 + 1))
            text = rng.integers(3, vocab, size=n).tolist()
            ids = text[:4] + dom + text[4:] + fun
            split = len(ids) - p
            head = Example(ids, [IGNORE] * len(ids), 0, head_index=0, head_pos=len(ids) - 1,
                           head_target=[float(rng.normal())], split=split)
            answer = rng.integers(3, vocab, size=int(rng.integers(16, 33))).tolist()
            text_ids = ids + answer
            targets = [IGNORE] * len(ids) + [IGNORE] * len(answer)
            for t in range(len(ids), len(text_ids)):
                targets[t - 1] = text_ids[t]
            self.head_examples.append(head)
            self.text_examples.append(Example(text_ids, targets, 0, split=split))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.peft_model, self.peft_head, self.peft_opt = self._peft(2 * p, hidden)

    def _peft(self, virtual: int, hidden: int):
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        plain = copy.deepcopy(self.base.model)  # PEFT wraps its model in place; ours keeps the hooks
        for param in plain.parameters():
            param.requires_grad_(False)
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
        model = get_peft_model(plain, config)
        model, head = dist.place(model), dist.place(torch.nn.Linear(hidden, 1))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-4)
        return model, head, opt

    def _strip(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """The same batch for PEFT: tags dropped (its prompt goes first), right-padded."""
        rows = self.bank.first_id
        stripped = []
        for e in examples:
            keep = [i for i, t in enumerate(e.ids) if t < rows]
            ids = [e.ids[i] for i in keep]
            targets = [e.lm_targets[i] if e.lm_targets[i] < rows else IGNORE for i in keep]
            labels = [IGNORE] + targets[:-1]  # HF labels: the token itself, shifted inside the model
            stripped.append(Example(ids, labels, 0))
        batch = on_device(collate(stripped, self.base.tokenizer.pad_token_id))
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["lm_targets"]}

    # -- steps (each returns the loss before backward, so saved_bytes can wrap the forward) --
    def ours(self, text: bool, split: bool) -> torch.Tensor:
        examples = self.text_examples if text else self.head_examples
        self.model.uses_lm_head = text
        return self.model(**on_device(collate(examples, self.base.tokenizer.pad_token_id, split_layout=split)))

    def inputs_embeds(self) -> torch.Tensor:
        """The same head step as `ours(split=False)`, but the tags built into inputs_embeds by hand (no hooks)."""
        batch = on_device(collate(self.head_examples, self.base.tokenizer.pad_token_id))
        ids = batch["input_ids"]
        is_tag = ids >= self.bank.first_id
        embeds = self.base.model.get_input_embeddings().weight[ids.masked_fill(is_tag, 0)]
        embeds = torch.where(is_tag.unsqueeze(-1), self.bank.table()[(ids - self.bank.first_id).clamp(min=0)], embeds)
        self.model.splice.remove()
        try:
            hidden = self.model.decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                          position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        finally:
            self.model.splice = type(self.model.splice)(self.base.model.get_input_embeddings(), self.bank)
        rows = torch.arange(len(ids), device=ids.device)
        pred = self.model.heads[0](hidden[rows, batch["head_pos"]])
        return F.mse_loss(pred.squeeze(-1), batch["head_target"][:, 0])

    def peft(self, text: bool) -> torch.Tensor:
        batch = self._strip(self.text_examples if text else self.head_examples)
        if text:
            return self.peft_model(**batch).loss
        out = self.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True)
        last = batch["attention_mask"].sum(1) - 1 + self.peft_model.peft_config["default"].num_virtual_tokens
        pred = self.peft_head(out.hidden_states[-1][torch.arange(len(last), device=last.device), last])
        target = torch.tensor([e.head_target[0] for e in self.head_examples], device=pred.device)
        return F.mse_loss(pred.squeeze(-1), target)

    def timed(self, forward: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> float:
        synchronize()
        start = time.perf_counter()
        loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize()  # a GPU runs ahead of Python: time the work, not its launch
        return time.perf_counter() - start


def synchronize() -> None:
    if dist.device().type == "cuda":
        torch.cuda.synchronize()


def padding_efficiency(lengths: list[int], micro: int, bucketed: bool, seed: int = 0) -> float:
    """Real tokens / padded tokens over micro-batches cut from global batches of 8 micro-batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)).tolist()
    real = padded = 0
    per_global = micro * 8
    for start in range(0, len(order) - per_global + 1, per_global):
        pairs = [(0, i) for i in order[start:start + per_global]]
        chunks = micro_batches(pairs, {p: lengths[p[1]] for p in pairs}, micro, 0, 1) if bucketed else \
            [pairs[i:i + micro] for i in range(0, len(pairs), micro)]
        for chunk in chunks:
            sizes = [lengths[i] for _, i in chunk]
            real += sum(sizes)
            padded += max(sizes) * len(sizes)
    return real / padded


def evaluation_padding_efficiency(lengths: list[int], micro: int, by_length: bool) -> float:
    """Real tokens / padded tokens over a held-out set in record order, batched as evaluation batches it
    (`inference.batches_by_length`) or in record order (what it did before)."""
    examples = [Example([0] * n, [IGNORE] * n, 0) for n in lengths]
    chunks = [chunk for _, chunk in batches_by_length(examples, micro)] if by_length else \
        [examples[i:i + micro] for i in range(0, len(examples), micro)]
    return sum(lengths) / sum(max(len(e.ids) for e in chunk) * len(chunk) for chunk in chunks)


def data_pipeline(base, n: int = 400) -> tuple[list[int], float]:
    """Lengths of real encoded QED/descriptor prompts, and the pipeline's tokens/s (read, fill, tokenize, collate)."""
    from tagscale.config import DataConfig, TaskConfig
    from tagscale.data.encode import Encoder
    from tagscale.data.encoded_cache import encode_task
    from tagscale.data.records import read_records

    tasks = [TaskConfig(name="qed", template="# # Input: The SMILES of the molecule is <D> {smiles}. \n# # Output: the "
                        "quantitative estimate of druglikeness score is <F>", head="<F>", label="qed",
                        train=DataConfig(builtin="qed", options={"n_train": n, "n_test": 50})),
             TaskConfig(name="descriptor", template="# # Input: The protein sequence is <D> {seq}. \n# # Output: The "
                        "descriptor value is <F>", head="<F>", label="descriptor",
                        train=DataConfig(builtin="descriptor", options={"n_train": n, "n_test": 50}))]
    encoder = Encoder(base.tokenizer, {"<D>": list(range(10**6, 10**6 + 10)), "<F>": list(range(10**6 + 10, 10**6 + 20))},
                      {"<F>"}, ["<F>"], 4096)
    records = [read_records(t.train, t.name, "train") for t in tasks]  # cached after the first run
    start = time.perf_counter()
    examples = [e for t, r in zip(tasks, records) for e in encode_task(encoder, t, 0, r, "skip", t.name)[0]]
    for i in range(0, len(examples), 8):
        collate(examples[i:i + 8], 0)
    seconds = time.perf_counter() - start
    lengths = [len(e.ids) for e in examples]
    return lengths, sum(lengths) / seconds


def cpu_bf16_linear_backward() -> tuple[float, float]:
    """Seconds of one bf16 linear forward + backward on CPU at a LLaMA-7B MLP matrix (11008 x 4096, 24 tokens):
    torch's linear, then tagscale's (tagscale.runtime.cpu_linear.use_fast_cpu_low_precision_linear)."""
    from tagscale.runtime.cpu_linear import CpuLowPrecisionLinear

    weight = torch.randn(4096, 11008, dtype=torch.bfloat16)
    seconds = []
    for linear in (torch._C._nn.linear, CpuLowPrecisionLinear.apply):
        x = torch.randn(1, 24, 11008, dtype=torch.bfloat16, requires_grad=True)
        started = time.perf_counter()
        linear(x, weight).sum().backward()
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded:smollm2-135m", help="embedded:NAME, preset:NAME or a model folder")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=120, help="mean prefix tokens before the function tag")
    parser.add_argument("--p", type=int, default=10, help="vectors per tag")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="docs/bench/bench.json")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where the candidates run; auto: tagscale.runtime.distributed.dist.device(). cuda/cpu make a run on the other "
                             "an error instead of a silent comparison on the wrong device (cpu on a GPU machine: set "
                             "CUDA_VISIBLE_DEVICES=\"\")")
    args = parser.parse_args(argv)
    if args.device != "auto" and dist.device().type != args.device:
        raise UserError(f"--device {args.device}: this process computes on {dist.device()} "
                        + ("(no CUDA GPU visible)" if args.device == "cuda" else "(run with CUDA_VISIBLE_DEVICES=\"\")"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base_cfg = BaseConfig(preset=args.base.split(":", 1)[1]) if args.base.startswith("preset:") else \
        BaseConfig(path=args.base)
    if args.batch < 1 or args.prefix < 8 or args.repeats < 1:
        raise UserError("--batch, --prefix (>= 8) and --repeats must be positive")
    base = load_base(base_cfg)
    c = Candidates(base, args.p, args.batch, args.prefix)
    steps = {
        "tags by hooks (head task, full backward)": (lambda: c.ours(False, False), c.opt),
        "inputs_embeds by hand (head task)": (c.inputs_embeds, c.opt),
        "tagscale: prefix split (head task)": (lambda: c.ours(False, True), c.opt),
        "PEFT prompt tuning (head task)": (lambda: c.peft(False), c.peft_opt),
        "tagscale: prefix split (text task)": (lambda: c.ours(True, True), c.opt),
        "PEFT prompt tuning (text task)": (lambda: c.peft(True), c.peft_opt),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.warmup):
        for forward, opt in steps.values():
            c.timed(forward, opt)
    for _ in tqdm(range(args.repeats), desc="repeats", unit="round"):
        for name, (forward, opt) in steps.items():
            times[name].append(c.timed(forward, opt))
    median = {name: statistics.median(v) for name, v in times.items()}
    memory = {name: saved_bytes(forward) for name, (forward, _) in steps.items()}
    for _, opt in steps.values():
        opt.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in base.model.parameters()) - base.model.get_input_embeddings().weight.numel()
    peak, peak_source = peak_flops()
    head_tokens = sum(len(e.ids) for e in c.head_examples)
    text_tokens = sum(len(e.ids) for e in c.text_examples)
    lengths, pipeline_tps = data_pipeline(base)
    trainer_tps = head_tokens / median["tagscale: prefix split (head task)"]
    torch_linear_s, our_linear_s = cpu_bf16_linear_backward() if not torch.cuda.is_available() else (1.0, 1.0)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__},
        "setup": {"base": args.base, "non_embedding_params": n_params, "batch": args.batch, "prefix": args.prefix,
                  "p": args.p, "repeats": args.repeats, "dtype": str(next(base.model.parameters()).dtype)},
        "median_step_s": median,
        "saved_activation_bytes": memory,
        "ratios": {
            "hook overhead: hooks / hand-built inputs_embeds (goal <= 1.01)":
                median["tags by hooks (head task, full backward)"] / median["inputs_embeds by hand (head task)"],
            "prefix split / full backward (head task)":
                median["tagscale: prefix split (head task)"] / median["tags by hooks (head task, full backward)"],
            "tagscale / PEFT prompt tuning, head task (goal <= 0.5)":
                median["tagscale: prefix split (head task)"] / median["PEFT prompt tuning (head task)"],
            "tagscale / PEFT prompt tuning, text task (goal <= 0.6)":
                median["tagscale: prefix split (text task)"] / median["PEFT prompt tuning (text task)"],
            "activation memory: tagscale / PEFT, head task":
                memory["tagscale: prefix split (head task)"] / memory["PEFT prompt tuning (head task)"],
            "padding efficiency, length-bucketed (real / padded tokens)": padding_efficiency(lengths, args.batch, True),
            "padding efficiency, unbucketed (real / padded tokens)": padding_efficiency(lengths, args.batch, False),
            "evaluation padding efficiency, by length (real / padded tokens)":
                evaluation_padding_efficiency(lengths, 16, True),
            "evaluation padding efficiency, record order (real / padded tokens)":
                evaluation_padding_efficiency(lengths, 16, False),
            "data pipeline tokens/s / trainer tokens/s (goal >= 20)": pipeline_tps / trainer_tps,
            "CPU bf16 linear forward+backward, 7B MLP matrix: tagscale / torch": our_linear_s / torch_linear_s,
        },
        "throughput": {
            "tagscale head task tokens/s": trainer_tps,
            "tagscale text task tokens/s": text_tokens / median["tagscale: prefix split (text task)"],
            "MFU at 4N, full backward (head task)": 4 * n_params * head_tokens
            / median["tags by hooks (head task, full backward)"] / peak,
            "peak FLOP/s used": peak, "peak source": peak_source,
        },
    }
    width = max(len(k) for k in results["ratios"])
    print(f"\n{'step (median s)':<{width}}")
    for name, value in median.items():
        print(f"{name:<{width}} {value:10.4f}")
    print(f"\n{'ratio':<{width}}")
    for name, value in results["ratios"].items():
        print(f"{name:<{width}} {value:10.3f}")
    for name, value in results["throughput"].items():
        print(f"{name:<{width}} {value:>10.4g}" if isinstance(value, float) else f"{name:<{width}} {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
