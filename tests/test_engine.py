"""In one process, through the real DeepSpeed engine (ZeRO-3, world of one): what training may and may not touch."""

from __future__ import annotations

import torch

from conftest import train


def test_only_tags_and_heads_change_base_bitwise_equal(tmp_path, in_process_world):
    from tagscale.config import load_config
    from tagscale.runtime.distributed.dist import gathered
    from tagscale.trainer import build, train_steps

    stage1 = tmp_path / "s1"
    train("tests/recipes/tiny_stage1.yaml", f"output.dir={stage1}", "train.steps=2")
    cfg = load_config("tests/recipes/tiny_stage2.yaml", [f"output.dir={tmp_path / 's2'}", f"from_runs=[{stage1}]",
                                                         "train.steps=4"])
    session = build(cfg, "ds_configs/zero3_cpu.json")
    named = list(session.model.named_parameters())
    with gathered([p for _, p in named]):
        before = {n: p.detach().clone() for n, p in named}
    # ZeRO-3's optimizer steps flat fp32 copies; `fp16_groups` lists the module parameters behind them
    name_of = {id(p): n for n, p in named}
    optimized = [name_of.get(id(p), "<not a module parameter>") for g in session.engine.optimizer.fp16_groups for p in g]
    assert sorted(optimized) == sorted({"bank.tag1", "heads.0.linear.weight", "heads.0.linear.bias"})
    assert train_steps(session, 0)
    with gathered([p for _, p in named]):
        after = {n: p.detach().clone() for n, p in named}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in named if p.requires_grad}
    assert trainable == {"bank.tag1", "heads.0.linear.weight", "heads.0.linear.bias"}
    assert changed == trainable  # every trainable moved; nothing else did, bit for bit
    assert all(n.startswith(("bank.", "heads.")) for n in trainable)
    assert sum(1 for n in before if n.startswith("base.")) > 10


def test_generation_with_the_whole_base_gathered_matches_per_layer_gathers(tmp_path, in_process_world):
    """Greedy decoding with the base gathered once == ZeRO-3's per-layer gathers; afterwards ZeRO-3 is as it was."""
    from tagscale.eval import inference
    from tagscale.runtime.distributed.engine import whole_base_for_inference
    from tagscale.runtime.distributed.dist import is_partitioned
    from tagscale.config import load_config
    from tagscale.data.batches import collate
    from tagscale.trainer import build

    cfg = load_config("tests/recipes/tiny_stage1.yaml", [f"output.dir={tmp_path / 's1'}", "train.steps=1"])
    session = build(cfg, "ds_configs/zero3_cpu.json")
    model, offload = session.model, session.engine.optimizer.parameter_offload
    examples = [e for task in session.data.examples for e in task][:6]
    hooks = (len(offload.forward_hooks), len(offload.backward_hooks))
    base_params = [p for p in model.base.parameters() if is_partitioned(p)]
    assert len(base_params) > 10
    batch = collate(session.data.rank_micro_batches(0, cfg.train.micro_batch, 0, 1)[0], session.tokenizer.pad_token_id)
    with torch.no_grad():
        loss_before = float(session.engine(**batch))

    def decode(when: str) -> tuple[list[str], set]:
        with whole_base_for_inference(model, when):
            whole = {p.ds_status.name for p in base_params}
            texts = inference.generations(model, session.tokenizer, examples, 3, 8)
        return texts, whole

    per_layer, status_per_layer = decode("never")
    gathered, status_gathered = decode("always")
    assert status_per_layer == {"NOT_AVAILABLE"} and status_gathered == {"AVAILABLE"}
    assert gathered == per_layer and any(gathered)
    assert decode("auto") == (per_layer, {"AVAILABLE"})  # a tiny base fits: auto gathers
    # afterwards: partitioned again, the same hooks, and training's forward and backward still run through them
    assert {p.ds_status.name for p in base_params} == {"NOT_AVAILABLE"}
    assert (len(offload.forward_hooks), len(offload.backward_hooks)) == hooks
    loss = session.engine(**batch)
    assert float(loss) == loss_before  # bitwise: the same weights come back through the same hooks
    session.engine.backward(loss)
    session.engine.step()
