"""Start-up of the command lines: the C++ log level TensorFlow and XLA read, set from
``--verbosity`` before JAX (which sets its own) is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdpoint_jax.startup import TF_LOG_LEVEL_VARIABLE, requested_verbosity, tensorflow_log_level

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("argv", "verbosity"),
    [
        (["p", "select", "--workdir", "x"], None),
        (["p", "--verbosity=0", "--config.x=1", "--batch", "1,2"], 0),
        (["p", "train", "--verbosity", "-1", "--resume"], -1),
        (["p", "-v", "1"], 1),
        (["p", "--verbosity=loud"], None),  # malformed: the program reports it
        (["p", "--", "--verbosity=0"], None),  # after --: not a flag
    ],
)
def test_requested_verbosity(argv, verbosity):
    assert requested_verbosity(argv) == verbosity


def test_tensorflow_log_level_follows_absl_verbosity():
    # C++: 0 info, 1 warning, 2 error, 3 fatal; absl: 0 info, -1 warning, -2 error
    assert [tensorflow_log_level(v) for v in (None, -3, -2, -1, 0, 1)] == [
        "2",
        "3",
        "2",
        "1",
        "0",
        "0",
    ]


PROBE = (
    "import os, sys; sys.argv = ['prog', *sys.argv[1:]]; import sdpoint_jax, jax; "
    "from sdpoint_jax.startup import start_program; "
    "start_program('prog', host_memory=False); print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
)


@pytest.mark.parametrize(
    ("user_level", "args", "level"),
    [(None, [], "2"), (None, ["-v", "0"], "0"), (None, ["--verbosity=-1"], "1"), ("1", [], "1")],
)
def test_start_program_sets_the_level_jax_would_default(user_level, args, level):
    env = {key: value for key, value in os.environ.items() if key != TF_LOG_LEVEL_VARIABLE}
    if user_level is not None:
        env[TF_LOG_LEVEL_VARIABLE] = user_level
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.split() == [level]
