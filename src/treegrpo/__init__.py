"""treegrpo: tree-structured GRPO for online RL post-training of diffusion and flow image models."""

__version__ = "0.1.0"
