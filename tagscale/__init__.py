"""tagscale: Tag-LLM (Shen et al., ICML 2024) on a frozen, DeepSpeed-sharded causal LM."""

__version__ = "0.1.0"
