"""tagscale: Tag-LLM (Shen et al., ICML 2024) on a frozen, DeepSpeed ZeRO-3 sharded causal LM."""

from setuptools import find_packages, setup

setup(
    name="tagscale",
    version="0.1.0",
    description="Train Tag-LLM domain and function tags on a frozen LLM with DeepSpeed ZeRO-3",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tagscale", "tagscale.*"]),
    package_data={"tagscale": ["resources/*", "recipes/*.yaml"]},
    # torch is unpinned so that an installed build (a user's CUDA torch) always satisfies it and is never replaced.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.3",  # older releases crash with ZeRO-3 + frozen parameters + non-reentrant checkpointing
        "transformers>=5.0",
        "datasets",
        "sentencepiece",
        "pyyaml",
        "wandb",
        "safetensors",
        "accelerate",
        "tqdm",
        "numpy",
        "gguf",  # the embedded base ships as GGUF
        "scipy",
        "sacrebleu",
        "rdkit",
        "peptides>=0.5",
        "matplotlib",
        "scikit-learn",  # method: expert (tagscale/study/expert.py) only
    ],
    extras_require={"dev": ["pytest", "peft"]},
    entry_points={"console_scripts": ["tagscale-train=tagscale.train:cli", "tagscale-predict=tagscale.eval.predict:cli",
                                      "tagscale-eval=tagscale.eval.evaluate:cli"]},
)
