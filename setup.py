from setuptools import find_packages, setup

# `kernels/` lives at the repository root but installs as `lora.kernels`, so no top-level `kernels`
# module is installed (that name belongs to an unrelated PyPI package).
setup(
    name="lora-kernels-llama",
    version="0.1.0",
    description="A from-scratch LoRA library for Llama models with fused Triton kernels",
    packages=find_packages(include=["lora", "lora.*"]) + ["lora.kernels"],
    package_dir={"lora": "lora", "lora.kernels": "kernels"},
    python_requires=">=3.10",
    # The ranges CI installs and tests (.ci/run); nothing in the package branches on a version.
    install_requires=["torch>=2.13", "transformers>=5.24,<6", "safetensors>=0.4", "numpy", "tokenizers"],
    extras_require={
        "test": ["pytest>=7", "triton>=3.0; platform_system == 'Linux'", "tqdm", "matplotlib",
                 "bitsandbytes>=0.45", "peft>=0.13"],
        "plot": ["matplotlib"],
        "bench": ["peft>=0.13", "matplotlib"],
    },
)
