from setuptools import find_packages, setup

setup(
    name="flashu-fx",
    version="0.1.0",
    description="FlashU as a torch.compile backend: task-aware, training-free acceleration of Show-o2",
    packages=find_packages(include=["flashu_fx*", "passes*", "triton_kernels*", "harness*"]),
    package_data={"flashu_fx.testbed": ["weights/*"]},  # the shipped trained testbed
    entry_points={
        "console_scripts": ["flashu-generate=harness.generate:main", "flashu-answer=harness.answer:main"],
        # torch.compile(model, backend="flashu", options={...}): torch looks the name up here, no import needed
        "torch_dynamo_backends": ["flashu=flashu_fx.compiled.backend:flashu_compiler"],
    },
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors", "tqdm"],
    extras_require={
        # Upper bounds where a new major version can change behaviour the suite relies on.
        "test": ["pytest>=8,<10", "pytest-xdist>=3", "hypothesis>=6,<7", "transformers>=4.47,<6", "ruff", "matplotlib"],
        "plots": ["matplotlib"],
        "vae": ["diffusers>=0.33", "Pillow"],  # 0.33: the first release with AutoencoderKLWan
        "tokenizer": ["transformers>=4.47,<6"],
    },
)
