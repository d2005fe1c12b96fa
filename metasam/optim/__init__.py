"""torch.optim-style wrappers over the optimizer core, for ordinary supervised training."""

from metasam.optim.batchnorm import preserve_bn_stats
from metasam.optim.agnostic_sam import AgnosticSAM
from metasam.optim.sam import SAM

__all__ = ["SAM", "AgnosticSAM", "preserve_bn_stats"]
