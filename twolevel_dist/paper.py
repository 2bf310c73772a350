"""The paper's figures, keyed like ``build_model``: parameter counts (millions, Tables 1, 3 and
4) and WRN-28-10's CIFAR-10 error rates (Tables 1 and 3)."""

# network: (build_model name, keyword arguments, number of classes)
NETWORKS = {
    "WRN-28-10": ("wrn", {"depth": 28, "widen": 10}, 10),
    "WRN-34-2": ("wrn_imagenet", {"depth": 34, "widen": 2}, 1000),
    "MobileNetV2": ("mobilenet_v2", {"width_mult": 1.0}, 1000),
}

# (network, conv kind, N) -> parameters in millions, as printed in the paper.
PAPER_PARAMS_M = {
    ("WRN-28-10", "sc", 1): 36.48,
    ("WRN-28-10", "gc", 2): 18.25, ("WRN-28-10", "gc2l", 2): 18.35,
    ("WRN-28-10", "gc", 4): 9.14, ("WRN-28-10", "gc2l", 4): 9.25,
    ("WRN-28-10", "gc", 8): 4.58, ("WRN-28-10", "gc2l", 8): 4.74,
    ("WRN-28-10", "gc", 16): 2.30, ("WRN-28-10", "gc2l", 16): 2.54,
    ("WRN-34-2", "sc", 1): 86.03,
    ("WRN-34-2", "gc", 2): 43.55, ("WRN-34-2", "gc2l", 2): 43.71,
    ("WRN-34-2", "gc", 4): 22.31, ("WRN-34-2", "gc2l", 4): 22.50,
    ("WRN-34-2", "gc", 8): 11.69, ("WRN-34-2", "gc2l", 8): 11.95,
    ("WRN-34-2", "gc", 16): 6.38, ("WRN-34-2", "gc2l", 16): 6.78,
    ("MobileNetV2", "sc", 1): 3.50,
    ("MobileNetV2", "gc", 2): 2.44, ("MobileNetV2", "gc2l", 2): 2.47,
    ("MobileNetV2", "gc", 4): 1.91, ("MobileNetV2", "gc2l", 4): 1.95,
    ("MobileNetV2", "gc", 8): 1.65, ("MobileNetV2", "gc2l", 8): 1.72,
}

# WRN counts are reproduced exactly to the paper's two decimals; MobileNetV2's within 0.01M.
TOLERANCE_M = {"WRN-28-10": 0.005, "WRN-34-2": 0.005, "MobileNetV2": 0.01}

# (conv kind, N) -> WRN-28-10's CIFAR-10 test error (%), 200 epochs (Tables 1 and 3).
PAPER_CIFAR10_ERROR_WRN28_10 = {
    ("sc", 1): 4.19,
    ("gc", 2): 4.61, ("shuffle", 2): 4.00, ("flgc", 2): 4.62, ("gc2l", 2): 4.12,
    ("gc", 4): 5.32, ("shuffle", 4): 4.21, ("flgc", 4): 6.16, ("gc2l", 4): 4.34,
    ("gc", 8): 6.54, ("shuffle", 8): 4.73, ("flgc", 8): 9.81, ("gc2l", 8): 4.79,
    ("gc", 16): 8.33, ("shuffle", 16): 5.28, ("flgc", 16): 11.26, ("gc2l", 16): 4.95,
}
