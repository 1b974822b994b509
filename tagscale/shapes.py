"""The random-init shape presets (`base.preset`) and the embedded pretrained bases' shapes, torch-free.

One table for both readers: tagscale.bases builds a LlamaConfig from SHAPES, and the planner (tagscale.planner) does
its arithmetic on both tables without importing torch or transformers, so `tools/plan.py` answers at once.
"""

from __future__ import annotations

# Random-init shapes. LLaMA shapes follow the published configs (vocab 32000); the small ones serve tests and
# the cost curve of the scaling sweep.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "llama-20m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=32000),
    "llama-100m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=32000),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000),
    "llama-34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
}

# The embedded pretrained bases (tagscale.embedded.EMBEDDED_BASES), as the config.json keys the planner reads: so
# `tools/plan.py embedded:<name>` answers without dequantizing the base (7 GB of fp32 for the 1.5B).
# tests/test_embedded.py checks each against the config transformers reads from the base's GGUF header.
EMBEDDED_SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        tie_word_embeddings=True),
    "qwen2.5-coder-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936,
                               tie_word_embeddings=False),
    "qwen2.5-coder-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=False),
}
