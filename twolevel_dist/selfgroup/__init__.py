"""Self-grouping convolution (SG-CNN, Guo et al. 2020) and the self-grouped conversion of a trained
SC network into GC or GC-2L."""
