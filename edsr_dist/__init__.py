"""edsr-dist: distributed training of EDSR super-resolution networks."""

__version__ = "0.1.0"
