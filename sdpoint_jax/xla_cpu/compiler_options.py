"""XLA compiler options of the programs this package builds (``jax.jit(...,
compiler_options=...)``), per backend: only XLA:CPU gets any; GPU and TPU programs
compile with XLA's defaults.

* Inference programs (:func:`inference_compiler_options`), in one of two named sets
  (:data:`INFERENCE_OPTION_SETS`):

  - ``"single-convolution"``, the default: YNNPACK library fusions limited to single
    convolutions. Allowed to absorb element-wise ops, XLA:CPU fuses a whole
    pre-activation block (convs, batch norm, ReLU, the final pooling) into one fusion
    that runs slower than the separate ops at small batches: WRN-16-4 batch-1
    inference is faster with convolutions only, outputs identical
    (``benchmarks/README.md``, "Batch-1 inference"). Latency also follows FLOPs
    across instances, since no instance loses a fusion the full network has.
  - ``"xla-default"``: XLA's defaults. At larger batches the big fusions win: WRN-16-1
    at batch 64 ran the full network in 50 ms against 78 ms. The SDPoint pooling splits
    such a fusion, so instances gain less than their FLOPs say.

  The server (:mod:`sdpoint_jax.serve.engine`) compiles each (instance, batch) with
  the set its latency table measured fastest. Training steps showed no gain, so only
  inference programs use these sets.
* Training programs (:func:`train_compiler_options`), an option: most of a CPU train
  step's compile time is LLVM optimising the element-wise fusion kernels (``perf`` of
  one WRN-28-10 gradient program: LLVM's JIT layer 43% of the process's samples, XLA's
  fusion emitters 10%, HLO passes 4%), while its run time is in the matrix products
  and convolutions of the libraries XLA calls. A lower backend optimisation level
  (``compile.cpu_optimization_level``, e.g. 1; XLA's default is 3) compiles the
  WRN-28-10 gradient program 1.3-1.5x faster at the same step time
  (``benchmarks/README.md``, "Compilation"). Its gradients differ from the default
  level's in the last bits (relative 5e-6 on a WRN-10-1: the kernels sum in another
  order), so runs are not bit-identical to runs at the default level; hence it is off
  by default. A lower level set in ``XLA_FLAGS``
  (``--xla_backend_optimization_level=N``) wins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax

XLA_DEFAULT_OPTIMIZATION_LEVEL = 3

INFERENCE_OPTION_SETS: dict[str, dict[str, str]] = {
    "single-convolution": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    },
    "xla-default": {},
}
"""XLA:CPU options of inference programs, by name (module docstring)."""
DEFAULT_INFERENCE_OPTION_SET = "single-convolution"
_LEVEL_FLAG = re.compile(r"--xla_backend_optimization_level=(-?\d+)")


def check_inference_option_set(name: str) -> str:
    """``name`` if it names one of :data:`INFERENCE_OPTION_SETS`, else a ``ValueError``
    naming the choices."""
    if name not in INFERENCE_OPTION_SETS:
        raise ValueError(
            f"unknown inference compiler options {name!r}; choose from "
            f"{sorted(INFERENCE_OPTION_SETS)}"
        )
    return name


def timed_option_set(latency_row: Mapping[str, Any]) -> str:
    """The inference option set a ``latency.json`` row of
    :mod:`sdpoint_jax.bench.latency` was timed with: its ``compiler_options``; rows
    written before tables named their set were timed with the default one."""
    return latency_row.get("compiler_options", DEFAULT_INFERENCE_OPTION_SET)


def inference_compiler_options(
    backend: str | None = None, option_set: str = DEFAULT_INFERENCE_OPTION_SET
) -> dict[str, str]:
    """Options of inference programs on ``backend`` (default: JAX's default backend):
    on CPU those of ``option_set`` (default: library fusions limited to individual
    convolutions); none elsewhere."""
    options = INFERENCE_OPTION_SETS[check_inference_option_set(option_set)]
    return dict(options) if (backend or jax.default_backend()) == "cpu" else {}


def flags_optimization_level() -> int:
    """The backend optimisation level ``XLA_FLAGS`` sets (its last one), else XLA's
    default."""
    levels = _LEVEL_FLAG.findall(os.environ.get("XLA_FLAGS", ""))
    return int(levels[-1]) if levels else XLA_DEFAULT_OPTIMIZATION_LEVEL


def train_compiler_options(
    cpu_optimization_level: int | None, backend: str | None = None
) -> dict[str, int]:
    """Options of training programs on ``backend`` (default: JAX's default backend): on
    CPU with a ``cpu_optimization_level`` (0-3), that backend optimisation level unless
    ``XLA_FLAGS`` sets a lower one; none otherwise (XLA's defaults)."""
    if cpu_optimization_level is None or (backend or jax.default_backend()) != "cpu":
        return {}
    if not 0 <= cpu_optimization_level <= XLA_DEFAULT_OPTIMIZATION_LEVEL:
        raise ValueError(
            f"cpu_optimization_level must lie in [0, {XLA_DEFAULT_OPTIMIZATION_LEVEL}], "
            f"got {cpu_optimization_level}"
        )
    level = min(cpu_optimization_level, flags_optimization_level())
    return {"xla_backend_optimization_level": level}
