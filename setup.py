"""Packaging entry point for megatron_tanuki (console script `tanuki`)."""
from setuptools import find_packages, setup

setup(
    name="megatron_tanuki",
    version="0.1.0",
    description="Tanuki Japanese LLMs (dense, MoE, vision) on NVIDIA Megatron-Core: train, convert, serve.",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_tanuki", "megatron_tanuki.*"]),
    package_data={"megatron_tanuki": ["data/assets/*", "examples/*.yaml"]},
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
    ],
    extras_require={
        # GPU clusters: Transformer Engine brings fused kernels, grouped-GEMM experts and FP8.
        "te": ["transformer-engine[pytorch]"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["tanuki=megatron_tanuki.cli:main"]},
)
