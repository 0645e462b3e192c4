"""tip_verl: Token Importance in on-Policy distillation (TIP) for verl."""

from setuptools import find_packages, setup

# Versions below are the ones this project is tested with (CPU CI): verl 0.9.1 and the extras its
# default (V1) trainer needs, transformers inside verl's range; torch 2.13.0 via the `cpu` extra
# (GPU users keep the CUDA torch their vLLM build needs and add the `gpu` extra).
REQUIRES = [
    "torch>=2.6",
    "verl[verl-core]==0.9.1",
    "transformers>=5.5.3,<5.11,!=5.6.0",
    "TransferQueue>=0.1.10",
    "cachetools",
    "fastapi",
    "uvicorn",
    "pyzmq",
    "msgspec",
    "pandas",
    "pyarrow>=19.0.0",
    "matplotlib",
]

setup(
    name="tip_verl",
    version="0.1.0",
    description="TIP token selection for memory-efficient on-policy distillation in verl",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tip_verl", "tip_verl.*"]),
    install_requires=REQUIRES,
    extras_require={
        # GPU stack: verl's own GPU extras pin their torch; install these on a CUDA machine.
        "gpu": ["vllm", "flash-attn"],
        # The CPU build of torch this project is tested with (CI, README set-up).
        "cpu": ["torch==2.13.0"],
        "test": ["pytest>=8", "hypothesis>=6", "pytest-timeout"],
    },
    entry_points={
        "verl.plugins": ["tip_verl = tip_verl.verl_adapter.plugin"],
        "console_scripts": [
            "tip-verl-build-assets = tip_verl.assets.cli:main",
            "tip-verl-report = tip_verl.analysis.cli:main",
        ],
    },
)
