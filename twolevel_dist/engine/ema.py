"""A moving average of the weights (model EMA, as timm's ModelEmaV2), kept per shard.

Each rank averages its own shard: every parameter and floating buffer of it, after every
optimizer step, ema <- ema + (1 - decay) (live - ema); integer buffers (BatchNorm's step count)
are copied. Since the shards partition the model and the average is elementwise, the shards'
averages are the slices of the single-device model's average: consolidating them (as the live
weights are) gives the average the single-device run would keep. No communication per step.
"""

from contextlib import contextmanager

import torch

from twolevel_dist.parallel import unwrap


class ShardEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = unwrap(model), decay
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        averaged, live = [], []
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                averaged.append(self.state[key])
                live.append(value)
            else:
                self.state[key].copy_(value)
        torch._foreach_lerp_(averaged, live, 1 - self.decay)

    @contextmanager
    def swapped_in(self):
        """Inside the block the model holds the averaged weights (what it does to them there,
        such as averaging BatchNorm statistics over dp replicas, the average keeps); after it,
        its own again. In place: the optimizer and a compiled model keep their tensors."""
        live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.state)
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in self.model.state_dict().items():
                    self.state[key].copy_(value)
            self.model.load_state_dict(live)

    def state_dict(self) -> dict:
        return self.state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for key, value in self.state.items():
            value.copy_(state[key])
