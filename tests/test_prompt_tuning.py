"""`method: prompt_tuning` (the paper's baseline) on the tiny base, in one process through the real DeepSpeed engine
(ZeRO-3, a world of one): what it trains, where the prompt sits, and that the trained model is evaluated."""

from __future__ import annotations

import json
import math

import torch

DATA = "tests/data/fixture_protein_count.jsonl"


def test_prompt_tuning_trains_only_the_prompt_and_heads_at_the_start_of_the_input(tmp_path, in_process_world):
    from tagscale.runtime.distributed.dist import gathered
    from tagscale.eval import evaluate
    from tagscale.config import load_config
    from tagscale.methods import PROMPT
    from tagscale.trainer import build, train_steps

    out = tmp_path / "run"
    cfg = load_config("tests/recipes/tiny_head.yaml", ["method=prompt_tuning", f"output.dir={out}", "train.steps=2",
                                                       "evaluation.enabled=true", "evaluation.baselines=false",
                                                       f"tasks.0.eval={{path: {DATA}, limit: 8}}"])
    session = build(cfg, "ds_configs/zero3_cpu.json")
    model = session.model
    # one prompt as long as the recipe's tags together (<Count>: p 4); <Count> is kept only as its head's name
    assert [(s.name, s.p, s.trainable) for s in session.plan.specs] == [(PROMPT, 4, True)]
    assert model.head_names == ["<Count>"] and "<Count>" not in session.cfg.tasks[0].template

    named = list(model.named_parameters())
    name_of = {id(p): n for n, p in named}
    # ZeRO-3's optimizer steps flat fp32 copies; `fp16_groups` lists the module parameters behind them
    optimized = sorted(name_of.get(id(p), "?") for g in session.engine.optimizer.fp16_groups for p in g)
    assert optimized == sorted(["bank.tag0", "heads.0.linear.weight", "heads.0.linear.bias"])
    assert model.bank.param(PROMPT) is dict(named)["bank.tag0"]

    # the prompt's p placeholders open every example (after the tokenizer's BOS, where it adds one)
    prompt_ids = model.bank.placeholder_ids(PROMPT)
    bos = session.tokenizer.bos_token_id
    for example in session.data.examples[0]:
        start = 1 if bos is not None and example.ids[0] == bos else 0
        assert example.ids[start:start + len(prompt_ids)] == prompt_ids
        assert not set(prompt_ids) & set(example.ids[start + len(prompt_ids):])

    with gathered([p for _, p in named]):
        before = {n: p.detach().clone() for n, p in named}
    assert train_steps(session, 0)
    with gathered([p for _, p in named]):
        changed = {n for n, p in named if not torch.equal(before[n], p.detach())}
    assert changed == set(optimized)  # the prompt and the head moved, bit for bit nothing else

    results = evaluate.final(session.cfg, model, session.encoder, session.tokenizer, {})
    trained = json.loads((out / "eval.json").read_text())["count"]["trained"]
    assert trained["n"] == 8 and math.isfinite(trained["mse"])
    assert abs(trained["mse"] - results["count"]["trained"]["mse"]) <= 1e-12  # the file holds what was scored
