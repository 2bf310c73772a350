"""The consolidated single-device weights, ``model.pt``: ``{"model": state_dict on the CPU,
"meta": what built it}``. One home for writing it (train's final weights, compress's results)
and reading it (``init_from``, compress's ``checkpoint``)."""

from pathlib import Path

import torch

from twolevel_dist.engine.checkpoint import atomic_save, load_failure
from twolevel_dist.errors import ConfigError


def write_model_file(path: Path, state_dict: dict, meta: dict) -> None:
    """``state_dict``'s tensors moved to the CPU, with ``meta``, written atomically."""
    atomic_save({"model": {k: v.cpu() for k, v in state_dict.items()}, "meta": meta}, path)


def read_model_file(path: str, option: str, hint: str) -> tuple[dict, dict]:
    """(the weights, their meta) of a consolidated ``model.pt`` named by config option
    ``option``, on the CPU; a plain state dict is taken too (its meta: {}). A missing or
    unreadable file, or one that holds no weights, is a ConfigError that says so and gives
    ``hint`` as the fix."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{option}={path}: no such file; {hint}")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:       # a truncated or foreign file: say which, not a torch trace
        raise ConfigError(f"{option}={path} is not a readable model.pt ({load_failure(error)}); "
                          f"{hint}") from None
    wrapped = isinstance(saved, dict) and "model" in saved
    weights = saved["model"] if wrapped else saved
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor)
                                                for value in weights.values()):
        held = type(weights).__name__ if not isinstance(weights, dict) else "a dict of other things"
        raise ConfigError(f"{option}={path} holds {held}, not weights (a state dict, or "
                          f"model.pt's {{'model': state dict, 'meta': ...}}); {hint}")
    return weights, (saved.get("meta", {}) if wrapped else {})
