"""Host memory modes: tcmalloc reuses freed memory (runs without page faults), huge
pages cut the page faults of every run, a program restarts at most once and keeps
its arguments, and the environment and kernel checks behind it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sdpoint_jax import machine
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

# Runs a program whose 9 * 8 MiB temporary (a patch matrix; above glibc's largest mmap
# threshold, 32 MiB) is written and reduced, and prints the minor page faults of each of
# its runs after the first.
FAULTS_PER_RUN = """
import json, resource
import jax, jax.numpy as jnp
from sdpoint_jax.xla_cpu.conv_lowering import patches_by_slices
x = jnp.ones((8, 32, 32, 256))
run = jax.jit(lambda x: patches_by_slices(x, (3, 3), (1, 1), ((1, 1), (1, 1))).sum(axis=(1, 2)))
run(x).block_until_ready()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
TEMPORARY_SMALL_PAGES = 9 * 8 * 32 * 32 * 256 * 4 // 4096


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
    # Now and then a run still faults its temporary in again, whatever the release
    # rate (of 35 runs here: 1 with the mode's TCMALLOC_RELEASE_RATE=0, 2 with
    # gperftools' default); glibc unmaps it after every run.
    assert min(faults_per_run("tcmalloc")) < TEMPORARY_SMALL_PAGES / 100
    assert min(glibc_faults) > TEMPORARY_SMALL_PAGES / 2


# Logs its malloc set-up (and how the restart chose it) each time it starts, then
# restarts where wanted.
RESTARTING_PROGRAM = """
import os, sys
with open(sys.argv[1], "a") as log:
    names = ("LD_PRELOAD", "GLIBC_TUNABLES", "SDPOINT_JAX_HOST_MEMORY_SOURCE")
    setup = [os.environ.get(name, "-") for name in names]
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
        ("huge-pages", "-|glibc.malloc.check=0:glibc.malloc.hugetlb=1|environment"),
        pytest.param(
            "tcmalloc", "{tcmalloc}|glibc.malloc.check=0|environment", marks=needs_tcmalloc
        ),
    ],
)
def test_a_program_restarts_once_in_its_mode_with_its_arguments(tmp_path, mode, second_start):
    starts, output = run_restarting_program(
        tmp_path, SDPOINT_JAX_HOST_MEMORY=mode, GLIBC_TUNABLES="glibc.malloc.check=0"
    )
    tcmalloc = host_memory.tcmalloc_library()
    assert starts == ["-|glibc.malloc.check=0|-", second_start.format(tcmalloc=tcmalloc)]
    assert output == "arguments ['train', '--config.x=1']"


@needs_linux_glibc
def test_auto_mode_restarts_into_the_resolved_mode_at_most_once(tmp_path):
    started = host_memory.default_environment(os.environ)  # as the program starts
    expected, source = host_memory.resolve({**started, "JAX_PLATFORMS": "cpu"})
    starts, output = run_restarting_program(tmp_path)
    assert len(starts) == (1 if expected == "default" else 2)
    names = ("LD_PRELOAD", "GLIBC_TUNABLES", host_memory.SOURCE_VARIABLE)
    last = dict(zip(names, starts[-1].split("|"), strict=True))
    assert host_memory.active_mode({k: v for k, v in last.items() if v != "-"}) == expected
    assert last[host_memory.SOURCE_VARIABLE] == ("-" if expected == "default" else source)
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


@pytest.fixture(autouse=True)
def own_cache_dir(monkeypatch, tmp_path):
    """A cache directory of the test's own: no host memory record unless it writes one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@needs_huge_pages
def test_a_recorded_mode_decides_auto_where_the_preference_would_restart(tmp_path):
    # the preference here is huge pages (tcmalloc is preferred where installed)
    preferred = "tcmalloc" if host_memory.tcmalloc_library() else "huge-pages"
    host_memory.write_record("default", {"measured": "by hand"})
    starts, _ = run_restarting_program(tmp_path)
    assert starts == ["-|-|-"]  # runs as started: no restart
    host_memory.record_path().unlink()
    (tmp_path / "again").mkdir()
    starts, _ = run_restarting_program(tmp_path / "again")
    assert len(starts) == 2 and starts[-1].endswith("|preference")
    assert (
        host_memory.active_mode(
            dict(zip(("LD_PRELOAD", "GLIBC_TUNABLES"), starts[-1].split("|")[:2], strict=True))
        )
        == preferred
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
        "TCMALLOC_RELEASE_RATE": "0",
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
    own_settings = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1", "TCMALLOC_RELEASE_RATE": "5"}
    with_own_settings = host_memory.environment_for("tcmalloc", own_settings)
    assert with_own_settings == {**own_settings, "LD_PRELOAD": TCMALLOC}
    assert host_memory.default_environment(with_own_settings) == own_settings


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


def test_available_modes_follow_the_library_and_the_kernel(linux_with):
    linux_with(TCMALLOC, "madvise")
    assert host_memory.available_modes() == ("tcmalloc", "huge-pages", "default")
    linux_with(None, "always")
    assert host_memory.available_modes() == ("huge-pages", "default")
    linux_with(None, "never")
    assert host_memory.available_modes() == ("default",)


def test_a_record_round_trips_and_decides_auto_on_this_machine(linux_with):
    linux_with(TCMALLOC, "madvise")
    assert host_memory.read_record() is None
    figures = {"modes": [{"host_memory": "huge-pages", "mix_step_ms": 2226.0}]}
    path = host_memory.write_record("huge-pages", figures)
    assert path == host_memory.record_path()
    assert path.parent.parent == Path(os.environ["XDG_CACHE_HOME"]) / "sdpoint_jax"
    assert host_memory.read_record() == {
        "mode": "huge-pages",
        **machine.identity(),
        "figures": figures,
    }
    assert machine.identity()["glibc"] == "2.36"  # as the fixture pretends
    assert host_memory.resolve(CPU) == ("huge-pages", "recorded")
    # an explicit mode, another backend or a preloaded allocator still win
    assert host_memory.resolve({**CPU, "SDPOINT_JAX_HOST_MEMORY": "tcmalloc"}) == (
        "tcmalloc",
        "environment",
    )
    assert host_memory.resolve({"JAX_PLATFORMS": "cuda"}) == ("default", "preference")
    assert host_memory.resolve({**CPU, "LD_PRELOAD": "libjemalloc.so.2"}) == (
        "default",
        "environment",
    )
    with pytest.raises(ValueError, match="mode must be one of tcmalloc, huge-pages, default"):
        host_memory.write_record("auto", {})


@pytest.mark.parametrize("field", ["cpu_model", "kernel_release", "glibc"])
def test_a_record_of_another_machine_falls_back_to_the_preference(linux_with, field):
    linux_with(TCMALLOC, "madvise")
    path = host_memory.write_record("huge-pages", {})
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, field: record[field] + "-other"}))
    assert host_memory.recorded_mode() is None
    assert host_memory.resolve(CPU) == ("tcmalloc", "preference")


@pytest.mark.parametrize(
    "recorded, tcmalloc, thp_mode, expected",
    [("tcmalloc", None, "madvise", "huge-pages"), ("huge-pages", None, "never", "default")],
)
def test_a_recorded_mode_no_longer_available_falls_back_to_the_preference(
    linux_with, recorded, tcmalloc, thp_mode, expected
):
    linux_with(TCMALLOC, "madvise")
    host_memory.write_record(recorded, {})
    linux_with(tcmalloc, thp_mode)
    assert host_memory.resolve(CPU) == (expected, "preference")


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"mode": "fast"}', '{"mode": "default"}', "\xff"]
)
def test_a_corrupt_record_is_ignored_with_a_warning(linux_with, text):
    linux_with(None, "madvise")
    path = host_memory.record_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode("latin-1"))
    with pytest.warns(UserWarning, match=f"ignoring the host memory record {path}"):
        assert host_memory.resolve(CPU) == ("huge-pages", "preference")


def test_the_source_reported_is_how_the_running_mode_was_chosen(linux_with):
    linux_with(None, "madvise")
    huge = host_memory.environment_for("huge-pages", CPU)
    assert host_memory.mode_source(huge) == "preference"
    assert host_memory.mode_source(CPU) == "environment"  # not restarted into huge pages
    host_memory.write_record("default", {})
    assert host_memory.mode_source(CPU) == "recorded"
    assert host_memory.mode_source({**huge, "SDPOINT_JAX_HOST_MEMORY": "huge-pages"}) == (
        "environment"
    )
    assert host_memory.mode_source({**huge, host_memory.SOURCE_VARIABLE: "recorded"}) == (
        "recorded"
    )
    assert host_memory.mode_source({**CPU, "SDPOINT_JAX_HOST_MEMORY": "off"}) == "environment"
    restarted = {**huge, host_memory.SOURCE_VARIABLE: "preference"}
    assert host_memory.default_environment(restarted) == CPU
