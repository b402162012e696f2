"""sdpoint_jax vs eager PyTorch on the same CPU, measured in one run.

    python benchmarks/compare_pytorch.py --torch-python /path/to/python-with-torch

Alternates rounds (ours, PyTorch NCHW, PyTorch channels-last) so that the ratios share
the machine's state, and prints per-round figures, medians and the ratios
ours / PyTorch for the train step (images/s, higher is better) and batch-1 inference
(speed, higher is better). Default model: WRN-16-4 full instance, batch 128, random
data. Like the command-line tools, this script restarts itself in its host memory mode
(tcmalloc or huge pages for malloc, :mod:`sdpoint_jax.xla_cpu.host_memory`); PyTorch is then
measured twice, as it runs out of the box and in the same mode as ours
(``*_tcmalloc``, ``*_huge-pages``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # malloc is chosen at start-up: restart before any work
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package
    from sdpoint_jax.xla_cpu.host_memory import restart_with_host_memory

    restart_with_host_memory(__file__)

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from sdpoint_jax import machine
from sdpoint_jax.config import cifar_config
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.models import create
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run import create_optimizer, initial_state
from sdpoint_jax.training.steps import train_programs
from sdpoint_jax.training.trainee import SDPointTrainee
from sdpoint_jax.xla_cpu import host_memory
from sdpoint_jax.xla_cpu.compiler_options import inference_compiler_options
from sdpoint_jax.xla_cpu.conv_lowering import CONV_LOWERINGS, resolve_conv_lowering

HERE = Path(__file__).resolve().parent


def jax_figures(
    model_name: str, conv_lowering: str, batch: int, steps: int, infer_repeats: int
) -> dict:
    lowering = resolve_conv_lowering(conv_lowering)
    model = create(model_name)
    tx = create_optimizer(cifar_config(model_name, "cifar10"), steps_per_epoch=1000)
    mesh = parallel.create_mesh(jax.devices()[:1])
    trainee = SDPointTrainee(model)
    state = parallel.replicate(initial_state(trainee, tx, 32, seed=0), mesh)
    programs = train_programs(trainee, tx, state, mesh, batch, 32, conv_lowering=lowering)
    step = programs[Instance.full()]
    rng = np.random.default_rng(0)
    data = parallel.shard_batch(
        {
            "image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32),
        },
        mesh,
    )
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready((state, metrics))
        if i >= 2:
            times.append(time.perf_counter() - start)
    forward = jax.jit(
        functools.partial(model.apply, instance=Instance.full(), train=False),
        compiler_options=inference_compiler_options(),
    )
    one = jnp.asarray(data["image"][:1])
    forward = forward.lower(state.variables, one).compile()
    infer = []
    for i in range(infer_repeats + 5):
        start = time.perf_counter()
        forward(state.variables, one).block_until_ready()
        if i >= 5:
            infer.append(time.perf_counter() - start)
    return {
        "framework": f"jax {jax.__version__} (XLA:CPU, conv lowering {lowering})",
        "train_images_per_sec": batch / statistics.median(times),
        "infer_batch1_ms": 1e3 * statistics.median(infer),
    }


def torch_figures(
    python: str,
    model: list[str],
    layout: str,
    mode: str,
    batch: int,
    steps: int,
    infer_repeats: int,
) -> dict:
    """PyTorch's figures from a child process in host memory ``mode``."""
    command = [
        python,
        str(HERE / "pytorch_wrn.py"),
        *model,
        "--layout",
        layout,
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--infer-repeats",
        str(infer_repeats),
    ]
    env = host_memory.environment_for(mode, host_memory.default_environment(os.environ))
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python with torch installed")
    parser.add_argument("--model", default="wrn-16-4", help="wrn-D-W")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--infer-repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conv-lowering", choices=CONV_LOWERINGS, default="auto")
    args = parser.parse_args()
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", args.model)
    if not match:
        parser.error(f"--model must be a WRN such as wrn-16-4 (the reference), got {args.model}")
    mode = host_memory.active_mode()
    depth_width = ["--depth", match[1], "--width", match[2]]
    torch_runs = {
        layout + ("" if torch_mode == "default" else f"_{torch_mode}"): (layout, torch_mode)
        for torch_mode in dict.fromkeys(("default", mode))
        for layout in ("nchw", "channels_last")
    }
    rounds: dict[str, list[dict]] = {"jax": [], **{name: [] for name in torch_runs}}
    for round_index in range(args.rounds):
        rounds["jax"].append(
            jax_figures(args.model, args.conv_lowering, args.batch, args.steps, args.infer_repeats)
        )
        for name, (layout, torch_mode) in torch_runs.items():
            rounds[name].append(
                torch_figures(
                    args.torch_python,
                    depth_width,
                    layout,
                    torch_mode,
                    args.batch,
                    args.steps,
                    args.infer_repeats,
                )
            )
        print(f"round {round_index + 1}: " + json.dumps(rounds), file=sys.stderr)
    medians = {
        name: {
            key: statistics.median(r[key] for r in rows)
            for key in ("train_images_per_sec", "infer_batch1_ms")
        }
        for name, rows in rounds.items()
    }
    ours = medians["jax"]
    summary = {
        "model": args.model,
        "batch": args.batch,
        "host_memory": mode,
        "host_memory_source": host_memory.mode_source(),
        "cpu_model": machine.cpu_model(),
        "medians": medians,
        "ours_over_pytorch": {
            name: {
                "train_images_per_sec": ours["train_images_per_sec"]
                / medians[name]["train_images_per_sec"],
                "infer_batch1_speed": medians[name]["infer_batch1_ms"] / ours["infer_batch1_ms"],
            }
            for name in torch_runs
        },
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
