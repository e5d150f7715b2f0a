"""Packaging entry point for megatron_tanuki (console script `tanuki`)."""
import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("megatron_tanuki/__init__.py").read()).group(1)

setup(
    name="megatron_tanuki",
    version=VERSION,  # one place: megatron_tanuki/__init__.py
    description="Tanuki Japanese LLMs (dense, MoE, vision) on NVIDIA Megatron-Core: train, convert, serve.",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_tanuki", "megatron_tanuki.*"]),
    package_data={"megatron_tanuki": ["data/assets/*", "data/assets/topic-hub/*", "examples/*.yaml", "synth/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        "transformers>=5,<6",
        "safetensors",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        "numpy",
        "psutil",  # megatron-core dist_checkpointing writers need it
        "pillow",  # images for Tanuki-vision
        "tensorboard",  # training scalars (torch.utils.tensorboard)
        "fastapi",  # `tanuki serve` (OpenAI-compatible HTTP)
        "uvicorn",
        "httpx",  # `tanuki synth` against OpenAI-compatible servers
        "datasketch",  # `tanuki synth filter`: MinHash LSH near-duplicates
        "datasets",  # `tanuki synth export --to hf-dataset`, hf: seed sources
    ],
    extras_require={
        # GPU clusters: Transformer Engine brings fused kernels, grouped-GEMM experts and FP8.
        "te": ["transformer-engine[pytorch]"],
        "test": ["pytest", "pytest-timeout", "openai", "httpx"],  # openai: the real client against `tanuki serve`
    },
    entry_points={"console_scripts": ["tanuki=megatron_tanuki.cli:main"]},
)
