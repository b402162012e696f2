"""``python -m sdpoint_jax.flops --model M [--dataset D] [--json]``: FLOPs and
parameters of every SDPoint instance (:mod:`sdpoint_jax.models.cost`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data.specs import SPECS
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops, format_table, instance_costs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sdpoint_jax.flops",
        description="FLOPs (multiply and add counted separately) of every SDPoint instance.",
    )
    parser.add_argument("--model", required=True, help="e.g. wrn-28-10, resnext-101-32x4d")
    parser.add_argument("--dataset", choices=sorted(SPECS), default="cifar10")
    parser.add_argument("--image-size", type=int, help="override the data set's input size")
    parser.add_argument("--instances", default="all", help="'all' or e.g. 'full,3:0.5'")
    parser.add_argument("--json", action="store_true", help="print one JSON row per instance")
    args = parser.parse_args(argv)

    spec = SPECS[args.dataset]
    size, num_classes = args.image_size or spec.image_size, spec.num_classes
    try:
        model = create(args.model, num_classes=num_classes)
        instances = model.space.parse_list(args.instances)
        costs = instance_costs(model, (size, size), instances)
    except ValueError as err:
        parser.error(str(err))
    full = count_flops(model, Instance.full(), (size, size))
    if args.json:
        print(json.dumps([cost.as_row(full) for cost in costs], indent=1))
        return
    print(
        f"{args.model} on {args.dataset} ({size}x{size}): N = {model.num_points} points, "
        f"{costs[0].params / 1e6:.2f}M parameters"
    )
    print(format_table(costs, full))


if __name__ == "__main__":
    main()
