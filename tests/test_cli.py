"""The shared command-line runner: parsing, commands and their flags, help, errors,
and every entry point's start-up (no library log lines, one ``error: ...`` line)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from sdpoint_jax import cli, flops

ROOT = Path(__file__).resolve().parents[1]
QUICK_CONFIG = "experiments/configs/cifar10_quick.py"
START_UP_NOISE = re.compile(
    r"oneDNN|cpu_feature_guard|absl::InitializeLog|Logging before flag parsing|^[IWEF]\d{4} ",
    re.MULTILINE,
)


def _toy_program(calls: list) -> cli.Program:
    """Two commands: ``a`` takes ``--only-a`` and needs ``--must``; ``b`` raises what
    ``--fail`` names."""

    def define(flag_values: flags.FlagValues) -> None:
        flags.DEFINE_string("name", "x", "a name", flag_values=flag_values)
        flags.DEFINE_integer("only-a", 1, "for a", lower_bound=1, flag_values=flag_values)
        flags.DEFINE_string("must", None, "a needs it", flag_values=flag_values)
        flags.DEFINE_enum(
            "fail", "none", ["none", "usage", "user", "bug"], "", flag_values=flag_values
        )

    def run_a(flag_values: flags.FlagValues) -> tuple:
        calls.append("a")
        return flag_values.name, flag_values["only-a"].value, flag_values.must

    def run_b(flag_values: flags.FlagValues) -> str:
        errors = {"usage": cli.UsageError("bad form"), "user": FileNotFoundError("no such run")}
        errors["bug"] = KeyError("a bug")
        if flag_values.fail in errors:
            raise errors[flag_values.fail]
        return flag_values.name

    return cli.Program(
        module="toy",
        description="Toy program.",
        define_flags=define,
        commands={"a": cli.Command(run_a, "Command a.", needs=("must",)), "b": cli.Command(run_b)},
        only={"only-a": ("a",)},
    )


def _exit(program: cli.Program, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(program, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def test_commands_flags_and_results():
    calls = []
    program = _toy_program(calls)
    assert cli.run(program, ["a", "--must", "m", "--only-a=3", "--name", "n"]) == ("n", 3, "m")
    assert cli.run(program, ["--must=m", "a"]) == ("x", 1, "m")  # defaults, flags anywhere
    assert cli.run(program, ["b"]) == "x"
    assert calls == ["a", "a"]


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        ([], 2, "give one command out of a, b; got none"),
        (["c"], 2, "give one command out of a, b; got c"),
        (["a", "b", "--must=m"], 2, "give one command out of a, b; got a b"),
        (["a"], 2, "a needs --must"),
        (["b", "--only-a=2"], 2, "--only-a applies to a only, not to b"),
        (["a", "--must=m", "--only-a=0"], 2, "flag --only-a=0: 0 is not a positive integer"),
        (["a", "--must=m", "--nope"], 2, "Unknown command line flag 'nope'"),
        (["b", "--fail=usage"], 2, "bad form"),
        (["b", "--fail=user"], 1, "no such run"),
    ],
)
def test_errors_are_one_line_with_their_status(argv, status, message, capsys):
    code, error = _exit(_toy_program([]), argv, capsys)
    assert code == status
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error
    assert ("--help" in error) == (status == 2)  # usage errors point to the help


def test_a_bug_is_not_reported_as_a_user_error():
    with pytest.raises(KeyError, match="a bug"):
        cli.run(_toy_program([]), ["b", "--fail=bug"])


def test_help_lists_the_flags_a_command_takes(capsys):
    program = _toy_program([])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(program, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m toy COMMAND") and "Toy program." in text
    assert "--only-a: (a only) for a" in text and "--verbosity" in text
    with pytest.raises(SystemExit):
        cli.run(program, ["b", "-h"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m toy b") and "--only-a" not in text
    with pytest.raises(SystemExit):
        cli.run(program, ["a", "-h"])
    text = capsys.readouterr().out
    assert "Command a." in text and "--only-a" in text


def test_config_file_and_overrides_come_from_the_given_arguments(tmp_path):
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import ml_collections\n\n\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'epochs': 2, 'arg': arg})\n"
    )
    program = cli.Program(
        module="toy",
        description="",
        define_flags=lambda flag_values: None,
        commands=cli.Command(lambda flag_values: flag_values.config.to_dict()),
        required=("config",),
        config_file="a config",
    )
    assert cli.run(program, [f"--config={config_file}:x", "--config.epochs=5"]) == {
        "epochs": 5,
        "arg": "x",
    }
    assert cli.run(program, ["--config", str(config_file)]) == {"epochs": 2, "arg": None}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config.epochs=5"], "Unknown command line flag 'config.epochs'"),
        (["--config=/no/such.py"], "cannot load --config=/no/such.py: [Errno 2] No such file"),
        ([f"--config={QUICK_CONFIG}", "--config.num_epoch=3"], "--config has no field"),
        (
            [f"--config={QUICK_CONFIG}", "--config.optim.num_epochs=x"],
            "flag --config.optim.num_epochs=x",
        ),
    ],
)
def test_config_errors_are_usage_errors(argv, message, capsys):
    program = cli.Program(
        module="toy",
        description="",
        define_flags=lambda flag_values: None,
        commands=cli.Command(lambda flag_values: flag_values.config.optim.num_epochs),
        config_file="a config",
    )
    code, error = _exit(program, argv, capsys)
    assert code == 2 and message in error and error.count("\n") == 1, error


def test_calls_in_one_process_do_not_share_flag_values(capsys):
    flops.main(["--model", "wrn-10-1", "--json"])
    assert json.loads(capsys.readouterr().out)
    flops.main(["--model", "wrn-10-1"])  # --json of the call before is not kept
    assert "N = 3 points" in capsys.readouterr().out


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# Each entry point with a bad input that gets past flag parsing where it can. main's
# evaluate loads the libraries behind the commands (TensorFlow, orbax, JAX, Flax) before
# it finds no checkpoint; the others fail before they need them.
ENTRY_POINTS = {
    "sdpoint_jax.main": (["evaluate", f"--config={QUICK_CONFIG}", "--workdir=/nonexistent"], 1),
    "sdpoint_jax.flops": (["--model", "wrn-11-1"], 2),
    "sdpoint_jax.export": (["--workdir", "/nonexistent", "--out", "/nonexistent/x"], 1),
    "sdpoint_jax.bench": (["latency", "--model", "wrn-10-1", "--repeats", "0"], 2),
    "sdpoint_jax.analysis": (
        ["difficulty", "--config", QUICK_CONFIG, "--workdir", "/nonexistent", "--out", "/x"],
        1,
    ),
    "sdpoint_jax.compare": (["--workdir", "/nonexistent"], 2),
    "sdpoint_jax.time_to_accuracy": ([f"--config={QUICK_CONFIG}", "--config.nope=1"], 2),
    "sdpoint_jax.launch": (["--local-processes=2", "--devices-per-process=0", "--", "train"], 2),
    "sdpoint_jax.serve": (["--export", "/nonexistent"], 1),
    "sdpoint_jax.serve.loadtest": (["--url", "http://10.0.0.1:8000", "--rates", "5"], 1),
}


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_entry_points_start_quietly_and_report_one_error_line(module):
    helped = _run(module, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: python -m {module}")
    assert "--verbosity" in helped.stdout
    assert helped.stderr == "", helped.stderr
    argv, status = ENTRY_POINTS[module]
    failed = _run(module, *argv)
    assert failed.returncode == status, failed.stderr
    assert not START_UP_NOISE.search(failed.stderr), failed.stderr
    lines = failed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), failed.stderr


def _documented_command_lines() -> list[list[str]]:
    """Every ``python -m sdpoint_jax...`` line of the READMEs' bash blocks (continuations
    joined), split as a shell would."""
    lines = []
    for readme in ("README.md", "benchmarks/README.md", "experiments/README.md"):
        blocks = re.findall(r"```bash\n(.*?)```", (ROOT / readme).read_text(), re.DOTALL)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0]  # trailing comments
                if line.startswith("python -m sdpoint_jax"):
                    lines.append(shlex.split(line)[2:])
    return lines


def test_documented_command_lines_parse():
    lines = _documented_command_lines()
    assert {line[0] for line in lines} == set(ENTRY_POINTS)
    for module, *argv in lines:
        if importlib.util.find_spec(module).submodule_search_locations is not None:
            module += ".__main__"  # a package run with -m
        program = importlib.import_module(module).PROGRAM
        flag_values = cli.define_flags(program, argv)
        cli.parse(program, flag_values, argv)
