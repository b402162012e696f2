"""Start-up of the command lines: the C++ log level TensorFlow and XLA read, set from
``--verbosity`` before JAX (which sets its own) is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdpoint_jax.absl_log_filter import below_level
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


def run_program(
    code: str, args: list[str], environ: dict[str, str], first_on_path: Path | None = None
) -> subprocess.CompletedProcess:
    """Runs ``python -c code *args`` with the package importable (after ``first_on_path``),
    ``TF_CPP_MIN_LOG_LEVEL`` unset and ``environ`` added."""
    env = {key: value for key, value in os.environ.items() if key != TF_LOG_LEVEL_VARIABLE}
    path = [str(first_on_path)] if first_on_path else []
    env.update(environ, PYTHONPATH=os.pathsep.join([*path, str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


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
    user = {} if user_level is None else {TF_LOG_LEVEL_VARIABLE: user_level}
    assert run_program(PROBE, args, user).stdout.split() == [level]


NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


@pytest.mark.parametrize(
    ("line", "level", "below"),
    [
        (NOTICE + "\n", 1, True),
        (NOTICE + "\n", 0, False),
        ("I0000 00:00:1.5   18209 port.cc:153] oneDNN custom operations are on.\n", 1, True),
        ("I0000 00:00:1.5   18209 port.cc:153] oneDNN custom operations are on.\n", 0, False),
        ("W1201 10:00:00.1  7 x.cc:1] a warning\n", 1, False),
        ("W1201 10:00:00.1  7 x.cc:1] a warning\n", 2, True),
        ("E1201 10:00:00.1  7 x.cc:1] an error\n", 2, False),
        ("error: no trained run in /x\n", 3, False),
        ("Info about I0000 00:00\n", 3, False),
    ],
)
def test_below_level_matches_absl_lines_by_severity(line, level, below):
    assert below_level(line, level) is below


# A stand-in for TensorFlow's start-up: absl lines written to file descriptor 2 by native
# code while the package loads, around a Python warning and a line of its own.
NOISY_PACKAGE = f"""
import os, warnings
os.write(2, b"{NOTICE}\\n")
os.write(2, b"I0000 00:00:1.5   18209 port.cc:153] oneDNN custom operations are on.\\n")
warnings.warn("a Python warning")
os.write(2, b"W1201 10:00:00.1  7 x.cc:1] a warning\\n")
os.write(2, b"a line of its own\\n")
"""
IMPORTING_PROGRAM = (
    "import sys; sys.argv = ['prog', *sys.argv[1:]]; import sdpoint_jax; "
    "from sdpoint_jax.startup import start_program; "
    "start_program('prog', host_memory=False); "
    "sys.stderr.write('before\\n'); import tensorflow; sys.stderr.write('after\\n')"
)


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        ([], ["before", "UserWarning", "a line of its own", "after"]),
        (["--verbosity=-1"], ["before", "UserWarning", "W1201", "a line of its own", "after"]),
        (["-v", "0"], ["before", NOTICE, "I0000", "UserWarning", "W1201", "a line", "after"]),
    ],
)
def test_tensorflow_start_up_notes_below_the_level_are_dropped(tmp_path, args, shown):
    package = tmp_path / "tensorflow"
    package.mkdir()
    (package / "__init__.py").write_text(NOISY_PACKAGE)
    result = run_program(IMPORTING_PROGRAM, args, {}, first_on_path=tmp_path)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("  warnings")]
    assert len(lines) == len(shown), result.stderr
    for line, start in zip(lines, shown, strict=True):
        assert start in line, result.stderr
