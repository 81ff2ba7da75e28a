"""paddle-rlhf: SFT, reward modelling and PPO for PaddleNLP causal language models."""

__version__ = "0.1.0"
