"""Host memory modes: tcmalloc reuses freed memory (runs without page faults), huge
pages cut the page faults of every run, a program restarts at most once and keeps
its arguments, and the environment and kernel checks behind it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from sdpoint_jax.xla_cpu import host_memory

TCMALLOC = "libtcmalloc_minimal.so.4"
on_linux_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_linux_glibc = pytest.mark.skipif(not on_linux_glibc, reason="needs Linux and glibc")
needs_huge_pages = pytest.mark.skipif(
    not (on_linux_glibc and host_memory.transparent_huge_page_mode() == "madvise"),
    reason="needs Linux, glibc and transparent huge pages in madvise mode",
)
needs_tcmalloc = pytest.mark.skipif(
    not (on_linux_glibc and host_memory.tcmalloc_library()),
    reason="needs tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4)",
)

# Runs a program whose 9 * 32 MiB temporary (a patch matrix) is written and reduced,
# and prints the minor page faults of each of its runs after the first.
FAULTS_PER_RUN = """
import json, resource
import jax, jax.numpy as jnp
from sdpoint_jax.xla_cpu.conv_lowering import _patches
x = jnp.ones((32, 32, 32, 256))
run = jax.jit(lambda x: _patches(x, (3, 3), (1, 1), ((1, 1), (1, 1))).sum(axis=(1, 2)))
run(x).block_until_ready()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
TEMPORARY_SMALL_PAGES = 9 * 32 * 32 * 32 * 256 * 4 // 4096


def faults_per_run(mode: str) -> list[int]:
    environ = host_memory.environment_for(mode, host_memory.default_environment(os.environ))
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_RUN],
        env={**environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def glibc_faults() -> list[int]:
    """Faults per run with glibc's ``malloc`` as it comes (measured once per module)."""
    return faults_per_run("default")


@needs_huge_pages
def test_huge_pages_cut_the_page_faults_of_every_run(glibc_faults):
    assert min(glibc_faults) > TEMPORARY_SMALL_PAGES / 2
    assert max(faults_per_run("huge-pages")) < TEMPORARY_SMALL_PAGES / 10


@needs_tcmalloc
def test_tcmalloc_reuses_freed_memory_where_glibc_faults_it_in_every_run(glibc_faults):
    # tcmalloc hands memory back to the kernel now and then (TCMALLOC_RELEASE_RATE), so
    # some runs fault it in again (about 1 in 3 here); glibc unmaps it after every run.
    assert min(faults_per_run("tcmalloc")) < TEMPORARY_SMALL_PAGES / 100
    assert min(glibc_faults) > TEMPORARY_SMALL_PAGES / 2


# Logs its malloc set-up each time it starts, then restarts where wanted.
RESTARTING_PROGRAM = """
import os, sys
with open(sys.argv[1], "a") as log:
    setup = [os.environ.get(name, "-") for name in ("LD_PRELOAD", "GLIBC_TUNABLES")]
    log.write("|".join(setup) + "\\n")
from sdpoint_jax.xla_cpu.host_memory import restart_with_host_memory
restart_with_host_memory(os.environ.get("PROGRAM_FILE", __file__))
print("arguments", sys.argv[2:])
"""


def run_restarting_program(tmp_path, **environ: str) -> tuple[list[str], str]:
    script, log = tmp_path / "program.py", tmp_path / "starts.log"
    script.write_text(RESTARTING_PROGRAM)
    env = {**host_memory.default_environment(os.environ), "JAX_PLATFORMS": "cpu", **environ}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    command = [sys.executable, "-u", str(script), str(log), "train", "--config.x=1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return log.read_text().splitlines(), result.stdout.strip()


@needs_linux_glibc
@pytest.mark.parametrize(
    "mode, second_start",
    [
        ("huge-pages", "-|glibc.malloc.check=0:glibc.malloc.hugetlb=1"),
        pytest.param("tcmalloc", "{tcmalloc}|glibc.malloc.check=0", marks=needs_tcmalloc),
    ],
)
def test_a_program_restarts_once_in_its_mode_with_its_arguments(tmp_path, mode, second_start):
    starts, output = run_restarting_program(
        tmp_path, SDPOINT_JAX_HOST_MEMORY=mode, GLIBC_TUNABLES="glibc.malloc.check=0"
    )
    tcmalloc = host_memory.tcmalloc_library()
    assert starts == ["-|glibc.malloc.check=0", second_start.format(tcmalloc=tcmalloc)]
    assert output == "arguments ['train', '--config.x=1']"


@needs_linux_glibc
def test_auto_mode_restarts_into_the_resolved_mode_at_most_once(tmp_path):
    started = host_memory.default_environment(os.environ)  # as the program starts
    expected = host_memory.resolved_mode({**started, "JAX_PLATFORMS": "cpu"})
    starts, output = run_restarting_program(tmp_path)
    assert len(starts) == (1 if expected == "default" else 2)
    last = dict(zip(("LD_PRELOAD", "GLIBC_TUNABLES"), starts[-1].split("|"), strict=True))
    assert host_memory.active_mode({k: v for k, v in last.items() if v != "-"}) == expected
    assert output == "arguments ['train', '--config.x=1']"


@needs_linux_glibc
@pytest.mark.parametrize(
    "environ",
    [
        {"SDPOINT_JAX_HOST_MEMORY": "default"},
        # the user's own choices are kept
        {"SDPOINT_JAX_HOST_MEMORY": "huge-pages", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
        {"LD_PRELOAD": "libjemalloc.so.2", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
        {"JAX_PLATFORMS": "tpu"},
        # its module run inside another program
        {"SDPOINT_JAX_HOST_MEMORY": "huge-pages", "PROGRAM_FILE": os.path.abspath(__file__)},
    ],
)
def test_no_restart_when_off_already_set_not_on_cpu_or_not_the_program(tmp_path, environ):
    starts, output = run_restarting_program(tmp_path, **environ)
    assert len(starts) == 1
    assert output == "arguments ['train', '--config.x=1']"


@needs_linux_glibc
def test_a_bad_mode_stops_the_program_naming_the_allowed_values(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_restarting_program(tmp_path, SDPOINT_JAX_HOST_MEMORY="off")
    assert failure.value.returncode == 1
    assert (
        "error: SDPOINT_JAX_HOST_MEMORY must be one of auto, tcmalloc, huge-pages, default; "
        "got 'off'" in failure.value.stderr
    )


@pytest.fixture
def linux_with(monkeypatch, tmp_path):
    """Pretends Linux with glibc, tcmalloc installed or not, and a THP mode."""

    def pretend(tcmalloc: str | None, thp_mode: str) -> None:
        monkeypatch.setattr(platform, "system", lambda: "Linux")
        monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
        monkeypatch.setattr(host_memory, "tcmalloc_library", lambda: tcmalloc)
        mode_file = tmp_path / "enabled"
        mode_file.write_text(" ".join(f"[{m}]" if m == thp_mode else m for m in MODES_THP))
        monkeypatch.setattr(host_memory, "THP_MODE_FILE", mode_file)

    return pretend


MODES_THP = ("always", "madvise", "never")
CPU = {"JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize(
    "tcmalloc, thp_mode, environ, expected",
    [
        (TCMALLOC, "madvise", CPU, "tcmalloc"),
        (None, "madvise", CPU, "huge-pages"),
        (None, "always", CPU, "default"),
        (TCMALLOC, "madvise", {"JAX_PLATFORMS": "cuda"}, "default"),
        (TCMALLOC, "madvise", {**CPU, "LD_PRELOAD": "/opt/libjemalloc.so.2"}, "default"),
        (TCMALLOC, "madvise", {**CPU, "SDPOINT_JAX_HOST_MEMORY": "huge-pages"}, "huge-pages"),
        (TCMALLOC, "never", {**CPU, "SDPOINT_JAX_HOST_MEMORY": "default"}, "default"),
    ],
)
def test_auto_picks_tcmalloc_then_huge_pages_on_cpu(
    linux_with, tcmalloc, thp_mode, environ, expected
):
    linux_with(tcmalloc, thp_mode)
    assert host_memory.resolved_mode(environ) == expected


def test_asking_for_tcmalloc_where_it_is_missing_says_how_to_install_it(linux_with):
    linux_with(None, "madvise")
    with pytest.raises(ValueError, match="apt install libtcmalloc-minimal4"):
        host_memory.resolved_mode({**CPU, "SDPOINT_JAX_HOST_MEMORY": "tcmalloc"})


def test_environments_are_set_up_once_and_undone_alone(linux_with):
    linux_with(TCMALLOC, "madvise")
    user = {"LD_PRELOAD": "libfoo.so", "GLIBC_TUNABLES": "glibc.malloc.check=0", "A": "1"}
    tcmalloc = host_memory.environment_for("tcmalloc", user)
    assert tcmalloc == {
        **user,
        "LD_PRELOAD": f"{TCMALLOC} libfoo.so",
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**50),
    }
    huge = host_memory.environment_for("huge-pages", user)
    assert huge == {**user, "GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=1"}
    for mode, environ in (("tcmalloc", tcmalloc), ("huge-pages", huge)):
        assert host_memory.environment_for(mode, environ) == environ
        assert host_memory.active_mode(environ) == mode
        assert host_memory.default_environment(environ) == user
    assert host_memory.environment_for("default", user) == user
    assert host_memory.active_mode(user) == "default"
    assert host_memory.default_environment(host_memory.environment_for("huge-pages", {})) == {}
    own_threshold = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1"}
    assert host_memory.environment_for("tcmalloc", own_threshold) == {
        **own_threshold,
        "LD_PRELOAD": TCMALLOC,
    }


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
