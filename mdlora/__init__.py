"""mdlora: multi-domain CTR prediction with low-rank adapters."""

__version__ = "0.1.0"
