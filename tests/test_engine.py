"""In one process, through the real DeepSpeed engine (ZeRO-3, world of one): what training may and may not touch."""

from __future__ import annotations

import torch

from conftest import train


def test_only_tags_and_heads_change_base_bitwise_equal(tmp_path):
    from tagscale import dist
    from tagscale.config import load_config
    from tagscale.train import build, train_steps

    stage1 = tmp_path / "s1"
    train("tests/recipes/tiny_stage1.yaml", f"output.dir={stage1}", "train.steps=2")
    cfg = load_config("tests/recipes/tiny_stage2.yaml", [f"output.dir={tmp_path / 's2'}", f"from_runs=[{stage1}]",
                                                         "train.steps=4"])
    dist.init()
    session = build(cfg, "ds_configs/zero3_cpu.json")
    named = list(session.model.named_parameters())
    with dist.gathered([p for _, p in named]):
        before = {n: p.detach().clone() for n, p in named}
    optimized = {id(p) for group in session.engine.optimizer.param_groups for p in group["params"]} \
        if hasattr(session.engine.optimizer, "param_groups") else set()
    assert train_steps(session, 0)
    with dist.gathered([p for _, p in named]):
        after = {n: p.detach().clone() for n, p in named}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in named if p.requires_grad}
    assert trainable == {"bank.tag1", "heads.0.linear.weight", "heads.0.linear.bias"}
    assert changed == trainable  # every trainable moved; nothing else did, bit for bit
    assert all(n.startswith(("bank.", "heads.")) for n in trainable)
    assert sum(1 for n in before if n.startswith("base.")) > 10
    del optimized
