from setuptools import find_packages, setup

setup(
    name="flashu-fx",
    version="0.1.0",
    description="FlashU as a torch.compile backend: task-aware, training-free acceleration of Show-o2",
    packages=find_packages(include=["flashu_fx*", "passes*", "triton_kernels*", "harness*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers>=4.47", "ruff"],
        "plots": ["matplotlib"],
        "vae": ["diffusers"],
        "tokenizer": ["transformers>=4.47"],
    },
)
