"""``python -m sdpoint_jax.flops --model M [--dataset D] [--json]``: FLOPs and
parameters of every SDPoint instance (:mod:`sdpoint_jax.models.cost`), multiply and
add counted separately. For a network with exits (``msdnet-K``) one row per exit:
``exit``, ``flops`` (the same convention), ``madds`` (multiply-accumulates of
convolutions and linear layers, IMTA's convention) and ``params``, each counting
everything a sample leaving at that exit has run (blocks ``1..i`` and classifiers
``1..i``, as MSDNet's and IMTA's per-exit costs)."""

from __future__ import annotations

if __name__ == "__main__":  # before any library loads
    from sdpoint_jax.startup import start_program

    start_program(__file__, host_memory=False)

import json
from collections.abc import Sequence
from typing import Any

from absl import flags

from sdpoint_jax import cli
from sdpoint_jax.data.specs import SPECS


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("model", None, "e.g. wrn-28-10, resnext-101-32x4d", **define)
    flags.DEFINE_enum("dataset", "cifar10", sorted(SPECS), "fixes input size and classes", **define)
    flags.DEFINE_integer(
        "image-size", None, "override the data set's input size", lower_bound=1, **define
    )
    flags.DEFINE_string("instances", "all", "'all' or e.g. 'full,3:0.5'", **define)
    flags.DEFINE_bool("json", False, "print one JSON row per instance", **define)


def print_costs(flag_values: flags.FlagValues) -> None:
    """Prints the table (or JSON rows) of every chosen instance's cost."""
    from sdpoint_jax.core.instance import Instance
    from sdpoint_jax.models import create, has_exits
    from sdpoint_jax.models.cost import count_flops, format_table, instance_costs

    spec = SPECS[flag_values.dataset]
    size = flag_values["image-size"].value or spec.image_size
    try:
        model = create(flag_values.model, num_classes=spec.num_classes)
        if has_exits(model):
            _print_exit_costs(flag_values, model, size)
            return
        instances = model.space.parse_list(flag_values.instances)
        costs = instance_costs(model, (size, size), instances)
    except ValueError as err:
        raise cli.UsageError(str(err)) from err
    full = count_flops(model, Instance.full(), (size, size))
    if flag_values.json:
        print(json.dumps([cost.as_row(full) for cost in costs], indent=1))
        return
    print(
        f"{flag_values.model} on {flag_values.dataset} ({size}x{size}): "
        f"N = {model.num_points} points, {costs[0].params / 1e6:.2f}M parameters"
    )
    print(format_table(costs, full))


def _print_exit_costs(flag_values: flags.FlagValues, model: Any, size: int) -> None:
    """Per-exit rows of a network with exits (module docstring)."""
    from sdpoint_jax.models.cost import exit_costs

    if flag_values.instances != "all":
        raise ValueError(f"{flag_values.model} has exits, not SDPoint instances: drop --instances")
    costs = exit_costs(model, (size, size))
    if flag_values.json:
        print(json.dumps([cost.as_row() for cost in costs], indent=1))
        return
    print(
        f"{flag_values.model} on {flag_values.dataset} ({size}x{size}): "
        f"{model.num_exits} exits, {costs[-1].params / 1e6:.2f}M parameters"
    )
    print(f"{'exit':>4} {'GFLOPs':>9} {'MMADDs':>9} {'params (M)':>10}")
    for cost in costs:
        print(
            f"{cost.exit:>4} {cost.flops / 1e9:>9.4f} {cost.madds / 1e6:>9.2f} "
            f"{cost.params / 1e6:>10.3f}"
        )


PROGRAM = cli.Program(
    module="sdpoint_jax.flops",
    description=__doc__,
    define_flags=define_flags,
    commands=cli.Command(print_costs),
    required=("model",),
)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command line ``argv`` (default: this process's, without the program name)."""
    cli.run(PROGRAM, argv)


if __name__ == "__main__":
    main()
