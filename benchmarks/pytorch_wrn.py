"""Eager PyTorch reference: WRN-d-w train step and inference speed on the CPU.

Run with a Python that has ``torch`` (it is not a dependency of sdpoint_jax)::

    python benchmarks/pytorch_wrn.py --layout nchw --batch 128 --steps 10

Prints one JSON object: train images/s (SGD-Nesterov step, batch ``--batch``) and
median inference milliseconds at batch 1 (eval mode, no grad). The network is the
same pre-activation WRN as ``sdpoint_jax.models.wrn`` (full instance).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(preact))))
        return y + (x if self.shortcut is None else self.shortcut(preact))


def wide_resnet(depth: int, width: int, num_classes: int = 10) -> nn.Module:
    n = (depth - 4) // 6
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    cin = 16
    for stage, base in enumerate((16, 32, 64)):
        for block in range(n):
            layers.append(Block(cin, base * width, 2 if stage and not block else 1))
            cin = base * width
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


def median_seconds(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--infer-repeats", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = wide_resnet(args.depth, args.width)
    memory_format = (
        torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    )
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(
        model.parameters(), 0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    images = torch.randn(args.batch, 3, 32, 32).to(memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch,))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    model.train()
    step = median_seconds(train_step, args.steps, warmup=2)
    model.eval()
    one = images[:1].contiguous(memory_format=memory_format)
    with torch.no_grad():
        infer = median_seconds(lambda: model(one), args.infer_repeats, warmup=5)
    print(
        json.dumps(
            {
                "framework": f"pytorch {torch.__version__} eager",
                "layout": args.layout,
                "threads": torch.get_num_threads(),
                "train_images_per_sec": args.batch / step,
                "train_step_ms": 1e3 * step,
                "infer_batch1_ms": 1e3 * infer,
            }
        )
    )


if __name__ == "__main__":
    main()
