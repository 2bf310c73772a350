"""twolevel_dist: two-level group convolution (GC-2L), one rank per group."""

__version__ = "0.1.0"
