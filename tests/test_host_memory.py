"""Huge pages for malloc: fewer page faults per run, a restart that keeps the program's
arguments and happens once, and the environment and kernel checks behind it."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

import pytest

from sdpoint_jax import host_memory

needs_huge_pages = pytest.mark.skipif(
    not host_memory.huge_pages_wanted({**os.environ, "JAX_PLATFORMS": "cpu"}),
    reason="needs Linux, glibc and transparent huge pages in madvise mode",
)

# Runs a program whose 9 * 32 MiB temporary (a patch matrix) is written and reduced,
# and prints the minor page faults of each of its runs after the first.
FAULTS_PER_RUN = """
import json, resource
import jax, jax.numpy as jnp
from sdpoint_jax.conv_lowering import _patches
x = jnp.ones((32, 32, 32, 256))
run = jax.jit(lambda x: _patches(x, (3, 3), (1, 1), ((1, 1), (1, 1))).sum(axis=(1, 2)))
run(x).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
TEMPORARY_SMALL_PAGES = 9 * 32 * 32 * 32 * 256 * 4 // 4096


def median_faults(environ: dict[str, str]) -> float:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_RUN],
        env={**environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        check=True,
    )
    return statistics.median(json.loads(result.stdout.strip().splitlines()[-1]))


@needs_huge_pages
def test_huge_pages_cut_the_page_faults_of_every_run():
    default = median_faults(host_memory.without_huge_pages(os.environ))
    huge = median_faults(host_memory.with_huge_pages(os.environ))
    assert default > TEMPORARY_SMALL_PAGES / 2, default
    assert huge < TEMPORARY_SMALL_PAGES / 10, huge


# Appends GLIBC_TUNABLES to a log each time it starts, then restarts where wanted.
RESTARTING_PROGRAM = """
import os, sys
with open(sys.argv[1], "a") as log:
    log.write(os.environ.get("GLIBC_TUNABLES", "-") + "\\n")
from sdpoint_jax.host_memory import restart_with_huge_pages
restart_with_huge_pages(os.environ.get("PROGRAM_FILE", __file__))
print("arguments", sys.argv[2:])
"""


def run_restarting_program(tmp_path, **environ: str) -> tuple[list[str], str]:
    script, log = tmp_path / "program.py", tmp_path / "starts.log"
    script.write_text(RESTARTING_PROGRAM)
    env = {**host_memory.without_huge_pages(os.environ), "JAX_PLATFORMS": "cpu", **environ}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    command = [sys.executable, "-u", str(script), str(log), "train", "--config.x=1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return log.read_text().splitlines(), result.stdout.strip()


@needs_huge_pages
def test_a_program_restarts_once_with_huge_pages_and_its_arguments(tmp_path):
    starts, output = run_restarting_program(tmp_path, GLIBC_TUNABLES="glibc.malloc.check=0")
    assert starts == ["glibc.malloc.check=0", "glibc.malloc.check=0:glibc.malloc.hugetlb=1"]
    assert output == "arguments ['train', '--config.x=1']"


@needs_huge_pages
@pytest.mark.parametrize(
    "environ",
    [
        {"SDPOINT_JAX_HUGE_PAGES": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice is kept
        {"JAX_PLATFORMS": "tpu"},
        {"PROGRAM_FILE": os.path.abspath(__file__)},  # its module run inside another program
    ],
)
def test_no_restart_when_opted_out_already_set_not_on_cpu_or_not_the_program(tmp_path, environ):
    starts, output = run_restarting_program(tmp_path, **environ)
    assert starts == [environ.get("GLIBC_TUNABLES", "-")]
    assert output == "arguments ['train', '--config.x=1']"


@needs_huge_pages
def test_a_bad_switch_value_stops_the_program_with_the_allowed_values(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_restarting_program(tmp_path, SDPOINT_JAX_HUGE_PAGES="off")
    assert failure.value.returncode == 1
    assert "error: SDPOINT_JAX_HUGE_PAGES must be 0 or 1, got 'off'" in failure.value.stderr


def test_tunables_are_added_once_and_removed_alone():
    added = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.check=0", "A": "1"})
    assert added == {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=1", "A": "1"}
    assert host_memory.with_huge_pages(added) == added
    assert host_memory.huge_pages_set(added)
    assert not host_memory.huge_pages_set({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert host_memory.with_huge_pages({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert host_memory.without_huge_pages(added) == {
        "GLIBC_TUNABLES": "glibc.malloc.check=0",
        "A": "1",
    }
    assert host_memory.without_huge_pages({"GLIBC_TUNABLES": host_memory.TUNABLE}) == {}


@pytest.mark.parametrize(
    "platforms, expected", [("cpu", True), ("tpu", False), ("cuda,cpu", False)]
)
def test_the_backend_is_judged_from_jax_platforms(platforms, expected):
    assert host_memory.cpu_backend_expected({"JAX_PLATFORMS": platforms}) is expected


def test_transparent_huge_page_mode_is_read_from_the_kernel_file(tmp_path, monkeypatch):
    mode_file = tmp_path / "enabled"
    monkeypatch.setattr(host_memory, "THP_MODE_FILE", mode_file)
    assert host_memory.transparent_huge_page_mode() is None
    mode_file.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_page_mode() == "madvise"
    assert host_memory.huge_pages_wanted({"JAX_PLATFORMS": "cpu"}) is (
        platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    )
    mode_file.write_text("[always] madvise never\n")
    assert not host_memory.huge_pages_wanted({"JAX_PLATFORMS": "cpu"})
