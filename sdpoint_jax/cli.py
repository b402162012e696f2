"""The one way every command line runs: ``python -m MODULE [COMMAND] --FLAG=VALUE ...``.

A :class:`Program` declares its flags (absl, defined on a ``flags.FlagValues`` of its
own for every call, so several programs can run in one process), its positional
commands and which flags each command takes; :func:`run` parses a command line and
runs it:

* ``--help`` (``-h``) prints the program's (or, after a command, that command's)
  description and flags and exits with status 0;
* a usage error (unknown or malformed flag, missing or misplaced flag, no or unknown
  command, or :class:`UsageError` raised by the command) prints one line
  ``error: ... (see python -m MODULE --help)`` on stderr and exits with status 2;
* a user error (:data:`USER_ERRORS`: bad input or a missing file, not a bug) prints one
  line ``error: ...`` and exits with status 1;
* library logs go to stderr in absl's format, errors only unless ``--verbosity``
  asks for more (the C++ side is set before TensorFlow loads,
  :mod:`sdpoint_jax.startup`);
* a command that trains joins a multi-process JAX job first
  (:func:`sdpoint_jax.training.parallel.initialize_distributed`; bad launch variables
  are a user error).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from sdpoint_jax.errors import (
    CheckpointError,
    DatasetUnavailableError,
    MemoryMapLimitError,
    ProcessFailedError,
)
from sdpoint_jax.startup import ERRORS_ONLY, define_verbosity_flag

UsageError = app.UsageError
"""Raised by a command for input that is wrong in form (reported with exit status 2)."""

HELP_ARGUMENTS = ("--help", "-h", "-help", "--helpfull", "--helpshort")
USAGE_STATUS = 2
USER_ERROR_STATUS = 1


USER_ERRORS = (
    CheckpointError,
    DatasetUnavailableError,
    MemoryMapLimitError,
    ProcessFailedError,
    FileExistsError,
    FileNotFoundError,
    ValueError,
)
"""Errors that mean bad input or a missing file, not a bug: reported without a stack
trace (:mod:`sdpoint_jax.errors`)."""


@dataclasses.dataclass(frozen=True)
class Command:
    """What a command runs, or all a program runs when it takes no command.

    Attributes:
      run: called with the parsed flags (and, for a program with ``trailing``, the
        arguments after ``--``); its result is :func:`run`'s.
      description: ``--help`` after the command prints it (default: the program's).
      needs: flags this command requires, besides the program's ``required``.
      trains: join a multi-host JAX job before running.
    """

    run: Callable[..., Any]
    description: str = ""
    needs: tuple[str, ...] = ()
    trains: bool = False


@dataclasses.dataclass(frozen=True)
class Program:
    """A command line.

    Attributes:
      module: run as ``python -m MODULE``.
      description: what ``--help`` prints above the flags (it describes the commands).
      define_flags: defines the program's flags on the ``FlagValues`` it is given.
      commands: the positional commands by name, or the one :class:`Command` of a
        program that takes none.
      required: flags every command needs.
      only: flag name -> the commands that take it; any other command rejects it.
      config_file: help of ``--config``, a config file (``FILE`` or ``FILE:ARG``, ``ARG``
        passed to its ``get_config``) whose fields ``--config.FIELD=VALUE`` override;
        ``None``: the program defines no such flag.
      trailing: what the arguments after ``--`` are, for a program without commands
        that takes them (its command is called with the flags and that list);
        ``None``: it takes none.
    """

    module: str
    description: str
    define_flags: Callable[[flags.FlagValues], None]
    commands: Mapping[str, Command] | Command
    required: tuple[str, ...] = ()
    only: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    config_file: str | None = None
    trailing: str | None = None

    @property
    def prog(self) -> str:
        return f"python -m {self.module}"


def define_flags(program: Program, argv: Sequence[str]) -> flags.FlagValues:
    """A new ``FlagValues`` with ``program``'s flags, ``--config`` (where it has one; its
    overrides are looked up in ``argv``) and ``--verbosity``; the help of every flag in
    ``program.only`` names its commands."""
    flag_values = flags.FlagValues()
    program.define_flags(flag_values)
    if program.config_file is not None:
        config_flags.DEFINE_config_file(
            "config",
            None,
            f"{program.config_file}; override any field with --config.FIELD=VALUE",
            flag_values=flag_values,
            lock_config=True,
            sys_argv=[program.prog, *argv],
        )
    define_verbosity_flag(flag_values)
    for name, commands in program.only.items():
        flag_values[name].help = f"({' and '.join(commands)} only) {flag_values[name].help}"
    return flag_values


def _flag_lines(flag: flags.Flag) -> str:
    names = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    if flag.short_name:
        names += f" (-{flag.short_name})"
    text = f"{names}: {flag.help}"
    if flag.default is not None and flag.default is not False:
        text += f" (default: {flag.default_as_str})"
    return flags.text_wrap(text, indent="      ", firstline_indent="  ")


def help_text(program: Program, flag_values: flags.FlagValues, command: str | None) -> str:
    """``--help``: usage, the description of ``program`` (or of ``command``) and the
    flags (those ``command`` takes)."""
    names = [name for name in flag_values if flag_values[name].name == name]
    description = program.description
    usage = program.prog if isinstance(program.commands, Command) else f"{program.prog} COMMAND"
    if command is not None:
        usage = f"{program.prog} {command}"
        description = program.commands[command].description or description
        names = [name for name in names if command in program.only.get(name, (command,))]
    flag_help = "\n".join(_flag_lines(flag_values[name]) for name in names)
    after = "" if program.trailing is None else " -- ARGUMENTS..."
    return (
        f"usage: {usage} [--FLAG=VALUE ...]{after}\n\n{description.strip()}\n\n"
        f"flags:\n{flag_help}\n"
    )


def split_trailing(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` before the first ``--``, and after it (empty without one)."""
    if "--" not in argv:
        return list(argv), []
    end = list(argv).index("--")
    return list(argv[:end]), list(argv[end + 1 :])


def _asked_for_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_ARGUMENTS for arg in split_trailing(argv)[0])


def _named_command(program: Program, argv: Sequence[str]) -> str | None:
    """The first word of ``argv`` that names one of the program's commands."""
    if isinstance(program.commands, Command):
        return None
    return next((arg for arg in argv if arg in program.commands), None)


def _innermost_message(err: BaseException) -> str:
    """The message of ``err``, out of exceptions wrapping it (ml_collections raises
    ``AttributeError(KeyError(message))`` for an unknown config field)."""
    while len(err.args) == 1 and isinstance(err.args[0], BaseException):
        err = err.args[0]
    return str(err.args[0]) if len(err.args) == 1 else str(err)


def _check_config_loaded(flag_values: flags.FlagValues) -> None:
    """Raises now the error of a config file that did not load (ml_collections raises it
    only when the config is first used)."""
    if flag_values.config is None:
        return
    try:
        flag_values.config.keys()
    except OSError as err:
        cause = str(err.__cause__ or err).strip().splitlines()[-1].strip()
        raise UsageError(f"cannot load {flag_values['config'].serialize()}: {cause}") from err


def _missing(flag_values: flags.FlagValues, name: str) -> bool:
    return flag_values[name].value in (None, [])


def parse(program: Program, flag_values: flags.FlagValues, argv: Sequence[str]) -> str | None:
    """Parses ``argv`` into ``flag_values`` and checks it against ``program``; returns the
    command (``None`` for a program without commands). ``flags.Error`` or
    :class:`UsageError` for a usage error."""
    # ml_collections' errors for a --config.FIELD override naming no field
    unknown_field = (AttributeError, KeyError) if program.config_file is not None else ()
    if program.trailing is not None:
        argv, trailing = split_trailing(argv)
        if not trailing:
            raise UsageError(f"give {program.trailing} after --")
    try:
        positional = flag_values([program.prog, *argv])[1:]
    except unknown_field as err:
        raise UsageError(f"--config has no field {_innermost_message(err)}") from err
    if program.config_file is not None:
        _check_config_loaded(flag_values)
    if isinstance(program.commands, Command):
        if positional:
            raise UsageError(f"unexpected arguments {' '.join(positional)}")
        command, needs = None, ()
    else:
        if len(positional) != 1 or positional[0] not in program.commands:
            raise UsageError(
                f"give one command out of {', '.join(program.commands)}; "
                f"got {' '.join(positional) or 'none'}"
            )
        command = positional[0]
        needs = program.commands[command].needs
        for name, commands in program.only.items():
            if flag_values[name].present and command not in commands:
                raise UsageError(
                    f"--{name} applies to {' and '.join(commands)} only, not to {command}"
                )
    for name in program.required:
        if _missing(flag_values, name):
            raise UsageError(f"--{name} is required")
    for name in needs:
        if _missing(flag_values, name):
            raise UsageError(f"{command} needs --{name}")
    return command


def show_library_logs(verbosity: int | None) -> None:
    """Python library logs (tensorflow-datasets, orbax, JAX, ...) on stderr in absl's
    format, from absl ``verbosity`` on (``None``: errors only)."""
    if not flags.FLAGS.is_parsed():
        # no global flags to parse; absl's handler would otherwise first announce
        # "Logging before flag parsing goes to stderr"
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(ERRORS_ONLY if verbosity is None else verbosity)


def _error_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _usage_error(program: Program, command: str | None, err: Exception) -> NoReturn:
    prog = program.prog if command is None else f"{program.prog} {command}"
    print(f"error: {_error_line(err)} (see {prog} --help)", file=sys.stderr)
    sys.exit(USAGE_STATUS)


def run(program: Program, argv: Sequence[str] | None = None) -> Any:
    """Runs ``program`` on ``argv`` (default: the command line, without the program
    name); returns what its command returns. Exits as the module docstring says."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flag_values = define_flags(program, argv)
    if _asked_for_help(argv):
        print(help_text(program, flag_values, _named_command(program, argv)), end="")
        sys.exit(0)
    try:
        name = parse(program, flag_values, argv)
    except (flags.Error, UsageError) as err:
        _usage_error(program, _named_command(program, argv), err)
    command = program.commands if name is None else program.commands[name]
    show_library_logs(flag_values.verbosity)
    try:
        if command.trains:
            from sdpoint_jax.training import parallel

            parallel.initialize_distributed()
        if program.trailing is not None:
            return command.run(flag_values, split_trailing(argv)[1])
        return command.run(flag_values)
    except UsageError as err:
        _usage_error(program, name, err)
    except USER_ERRORS as err:
        print(f"error: {_error_line(err)}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
