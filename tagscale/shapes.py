"""The random-init shape presets (`base.preset`), torch-free.

One table for both readers: tagscale.bases builds a LlamaConfig from it, and the planner (tagscale.planner) does
its arithmetic on it without importing torch or transformers, so `tools/plan.py` answers at once.
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
