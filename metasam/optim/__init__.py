"""torch.optim-style wrappers over the optimizer core, for ordinary supervised training."""

from metasam.optim.batchnorm import preserve_bn_stats
from metasam.optim.sam import SAM, AgnosticSAM

__all__ = ["SAM", "AgnosticSAM", "preserve_bn_stats"]
