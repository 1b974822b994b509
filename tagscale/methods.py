"""The scaling baselines as rewrites of a Tag-LLM recipe: same data, budget and metrics, other trainables.

- prompt_tuning (the paper's baseline): one randomly initialised prompt at the very start, as long as all the
  recipe's tags together (paper Table 6: 86K = the same count as two tags and a head), no domain or function tags;
  heads read the last prompt token.
- linear_probe: no tags at all; each head reads the frozen base's last prompt token.
"""

from __future__ import annotations

import copy
import re

from tagscale.config import TAG_NAME, RunConfig, TagConfig

PROMPT = "<Prompt>"


def apply_method(cfg: RunConfig, inherited_p: dict[str, int]) -> RunConfig:
    """The recipe as `cfg.method` trains it; `inherited_p` gives the length of each tag from earlier runs."""
    if cfg.method == "tag_llm":
        return cfg
    out = copy.deepcopy(cfg)
    lengths = {t.name: t.p for t in cfg.tags} | inherited_p
    head_holders = [t for t in cfg.tags if t.head is not None]  # kept for their heads; not used as tags
    total = 0
    for task in out.tasks:
        used = TAG_NAME.findall(task.template) + TAG_NAME.findall(task.target or "")
        total = max(total, sum(lengths.get(name, 0) for name in used))
        task.template = _without_tags(task.template)
        if task.target is not None:
            task.target = _without_tags(task.target) if task.target.strip() else task.target
    out.from_runs = []
    out.enrich = False
    out.tags = head_holders
    if cfg.method == "prompt_tuning":
        out.tags = [TagConfig(name=PROMPT, kind=cfg.trained_kind, p=max(total, 1), init="random")] + head_holders
        for task in out.tasks:
            task.template = PROMPT + task.template
    return out


def _without_tags(text: str) -> str:
    """The text with its tags removed and the spaces they leave collapsed."""
    return re.sub(r" {2,}", " ", TAG_NAME.sub("", text)).rstrip(" ")
