"""A small forward/backward of a GC-2L network and its parameter table (pre-training demo).

    python -m twolevel_dist.demo
"""

import time

import torch

from twolevel_dist.models import build_model, count_parameters
from twolevel_dist.params import format_markdown, paper_table


def main() -> int:
    torch.manual_seed(0)
    model = build_model("wrn", conv="gc2l", groups=2, depth=16, widen=4, num_classes=10)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    elapsed = time.perf_counter() - start
    print(f"WRN-16-4, GC-2L, N=2: {count_parameters(model):,} parameters; "
          f"forward+backward of 32 images in {elapsed:.2f} s, loss {loss.item():.3f}\n")
    print(format_markdown(paper_table()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
