"""Writes ``tests/data/adaptive_pool_golden.npz``: PyTorch adaptive pooling outputs.

Run with any Python that has ``torch`` and ``numpy``::

    python tests/tools/make_pooling_fixture.py

PyTorch is not a dependency of the package or of the tests: the tests only read the
``.npz`` written here (``tests/test_pooling.py``). Inputs are drawn with a fixed numpy
seed, stored NHWC; PyTorch pools them in NCHW and the outputs are transposed back to
NHWC. Cases with the same input shape share one input array to keep the file small.

Contents of the file:

* ``case_names``: one name per case, e.g. ``"7x10_to_4x6"``;
* ``x_{H}x{W}``: float32 input ``(2, H, W, 3)``, standard normal rounded to 1/256;
* ``input_{case}``: the name of that case's input array;
* ``out_hw_{case}``: ``(out_h, out_w)``;
* ``avg_{case}`` / ``max_{case}``: ``F.adaptive_avg_pool2d`` / ``F.adaptive_max_pool2d``;
* ``ratio_{case}``: a ratio ``r`` with ``(round(r*H), round(r*W)) == (out_h, out_w)``
  under Python's ``round`` (half to even), or NaN when the case is not such a size;
* ``round_table``: rows ``(size, ratio, round(ratio * size))`` computed with Python's
  ``round``, to cross-check ``sdpoint_jax.core.instance.downsampled_size``.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

SEED = 20180618
BATCH, CHANNELS = 2, 3

# (input (H, W), output (h, w), ratio or None)
CASES = [
    ((32, 32), (24, 24), 0.75),
    ((16, 16), (12, 12), 0.75),
    ((8, 8), (6, 6), 0.75),
    ((7, 7), (4, 4), 0.5),
    ((14, 14), (10, 10), 0.75),
    ((56, 56), (42, 42), 0.75),
    ((5, 5), (3, 3), None),
    ((7, 10), (4, 6), 0.6),
    ((9, 6), (5, 4), 0.6),
    ((112, 112), (28, 28), 0.25),
    ((112, 112), (42, 42), 0.375),
    ((4, 3), (6, 5), None),  # output larger than input: overlapping one-element bins
]

# (size, ratio): half-way products (10.5, 3.5, 2.5, 4.5, 1.5, 0.5) exercise half-to-even.
ROUND_SIZES = [
    (14, 0.75),
    (7, 0.5),
    (5, 0.5),
    (32, 0.75),
    (56, 0.75),
    (28, 0.5),
    (28, 0.75),
    (9, 0.5),
    (3, 0.5),
    (1, 0.5),
    (6, 0.75),
    (10, 0.75),
    (112, 0.25),
    (112, 0.375),
    (7, 0.75),
    (5, 0.75),
]

OUT_PATH = pathlib.Path(__file__).resolve().parents[1] / "data" / "adaptive_pool_golden.npz"


def main() -> None:
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    names = []
    for (in_h, in_w), (out_h, out_w), ratio in CASES:
        input_name = f"x_{in_h}x{in_w}"
        if input_name not in arrays:
            # Standard normal values rounded to multiples of 1/256: exact in float32, and
            # their few significant bits compress well (random full-precision floats don't).
            x = rng.standard_normal((BATCH, in_h, in_w, CHANNELS))
            arrays[input_name] = (np.round(x * 256.0) / 256.0).astype(np.float32)
        x_nhwc = arrays[input_name]
        x_nchw = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        avg = F.adaptive_avg_pool2d(x_nchw, (out_h, out_w)).numpy().transpose(0, 2, 3, 1)
        mx = F.adaptive_max_pool2d(x_nchw, (out_h, out_w)).numpy().transpose(0, 2, 3, 1)

        name = f"{in_h}x{in_w}_to_{out_h}x{out_w}"
        names.append(name)
        arrays[f"input_{name}"] = np.array(input_name)
        arrays[f"out_hw_{name}"] = np.array([out_h, out_w], np.int64)
        arrays[f"avg_{name}"] = np.ascontiguousarray(avg, np.float32)
        arrays[f"max_{name}"] = np.ascontiguousarray(mx, np.float32)
        if ratio is not None:
            rounded = (round(ratio * in_h), round(ratio * in_w))
            assert rounded == (out_h, out_w), (name, ratio, rounded)
        arrays[f"ratio_{name}"] = np.array(math.nan if ratio is None else ratio, np.float64)

    arrays["case_names"] = np.array(names)
    arrays["round_table"] = np.array(
        [(size, ratio, round(ratio * size)) for size, ratio in ROUND_SIZES], np.float64
    )
    arrays["torch_version"] = np.array(torch.__version__)
    arrays["seed"] = np.array(SEED)

    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT_PATH, **arrays)
    print(f"wrote {OUT_PATH} ({OUT_PATH.stat().st_size} bytes, {len(names)} cases)")


if __name__ == "__main__":
    main()
