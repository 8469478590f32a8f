"""Jamba, the hybrid Transformer-Mamba mixture-of-experts language model, in PyTorch."""

from jamba.model import HybridCache, Jamba, JambaArgs, JambaOutput, default_model_dir

__all__ = ["HybridCache", "Jamba", "JambaArgs", "JambaOutput", "default_model_dir"]
