from setuptools import find_packages, setup

setup(
    name="paddle-rlhf",
    version="0.1.0",
    description="SFT, reward modelling and PPO (RLHF) for PaddleNLP causal language models",
    packages=find_packages(include=["ppo", "ppo.*", "rm", "sft"]),
    # C++ sources of the CPU extension, compiled on first use (ppo/models/cpu_extension.py).
    package_data={"ppo.models": ["csrc/*.cc", "csrc/*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "paddlenlp==3.0.0b4",
        "datasets>=3.6",
        "sentencepiece",
        "numpy<2",
        "protobuf>=6,<7",
        "matplotlib",
        "tqdm",
    ],
)
