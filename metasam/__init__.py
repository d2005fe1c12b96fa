"""metasam: sharpness-aware meta-learning (SAM, ASAM, Agnostic-SAM; MAML and Sharp-MAML) in PyTorch."""

__version__ = "0.1.0"
