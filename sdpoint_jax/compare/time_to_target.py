"""Wall time to a target test accuracy: plain, low-mode, SDPoint and SDPoint + low mode.

``python -m sdpoint_jax.time_to_accuracy --config experiments/configs/lowmode_cifar10_quick.py
--workdir DIR`` trains one run per entry of ``config.time_to_accuracy.training_settings`` (each in
``DIR/<setting>/``, with :func:`sdpoint_jax.training.loop.train`: same data order, schedule and
seed) and reports, per setting, the training seconds and steps until the full
network's test accuracy first reached each of ``config.time_to_accuracy.accuracy_targets``.

A setting names what is switched on: ``"baseline"`` (the plain network), ``"low"``
(low mode with probability ``config.low_mode.prob``), ``"sdpoint"``, and
``"sdpoint+low"`` (both). Settings without ``low`` train with ``low_mode.prob = 0``.

Times are the ``train_seconds`` the training loop logs with every evaluation:
wall-clock seconds of the training steps only (evaluation and checkpoint saves are
paused out; compiling the step programs beforehand, ``config.compile.precompile``, is reported
apart as ``compile_seconds``). Accuracy is checked every ``config.run.eval_every_epochs``,
so a time is the time of the first evaluation at or above the target. A run that was
interrupted and resumed adds up its invocations' seconds; the steps between its last
evaluation and the interruption are then not counted.

Writes ``DIR/time_to_accuracy.csv`` and ``.json`` (one row per setting: ``setting``,
``steps``, ``low_mode_steps``, ``final_top1_accuracy``, ``train_seconds``,
``compile_seconds``, then ``seconds_to_<t>`` and ``steps_to_<t>`` for every target
``t``, empty where it was not reached) and prints the table. A finished setting is
read back from its log, not trained again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from sdpoint_jax.core.lowmode import LowMode

SETTINGS = ("baseline", "low", "sdpoint", "sdpoint+low")


def setting_config(config: ml_collections.ConfigDict, setting: str) -> ml_collections.ConfigDict:
    """``config`` with SDPoint and low mode switched as ``setting`` names them."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown training setting {setting!r}; choose from {SETTINGS}")
    if "low" in setting and config.low_mode.prob == 0.0 and not config.low_mode.epoch_probs:
        raise ValueError(f"setting {setting!r} needs config.low_mode.prob > 0")
    config = ml_collections.ConfigDict(config.to_dict())
    config.sdpoint.enabled = setting.startswith("sdpoint")
    if "low" not in setting:
        config.low_mode.prob, config.low_mode.epoch_probs = 0.0, None
    return config


def summarize(log_rows: Sequence[dict[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
    """One setting's row from its ``train_log.jsonl`` rows (in file order).

    Seconds add up across invocations: ``train_seconds`` restarts from 0 when a run is
    resumed, detected as a decrease between evaluations.
    """
    evaluations, compile_seconds, offset, previous = [], 0.0, 0.0, 0.0
    for row in log_rows:
        compile_seconds += row.get("compile_seconds", 0.0)
        if "eval_top1_accuracy" not in row:
            continue
        if row["train_seconds"] < previous:
            offset += previous
        previous = row["train_seconds"]
        evaluations.append((row["step"], row["eval_top1_accuracy"], offset + previous))
    if not evaluations:
        raise ValueError("the training log holds no evaluation")
    draws = next((row["draws"] for row in reversed(log_rows) if "draws" in row), {})
    low_steps = sum(n for key, n in draws.items() if key.startswith(LowMode.NAME_PREFIX))
    step, accuracy, seconds = evaluations[-1]
    summary = {
        "steps": step,
        "low_mode_steps": low_steps,
        "final_top1_accuracy": accuracy,
        "train_seconds": seconds,
        "compile_seconds": compile_seconds,
    }
    for target in targets:
        reached = next((e for e in evaluations if e[1] >= target), None)
        summary[f"seconds_to_{target:g}"] = None if reached is None else reached[2]
        summary[f"steps_to_{target:g}"] = None if reached is None else reached[0]
    return summary


def run_setting(config: ml_collections.ConfigDict, workdir: Path) -> list[dict[str, Any]]:
    """Trains (or resumes, or skips when finished) one setting; its log rows."""
    from sdpoint_jax.training.loop import train
    from sdpoint_jax.training.run import Run

    run = Run.create(config, workdir)
    with run.checkpoints() as manager:
        finished = manager.latest_step() == run.total_steps
    if not finished:
        train(config, workdir, resume=True)
    log = run.run_dir.train_log
    return [json.loads(line) for line in log.read_text().splitlines()]


def time_to_accuracy(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict]:
    """Trains every setting of ``config.time_to_accuracy.training_settings`` and writes
    the table."""
    from sdpoint_jax.bench import report
    from sdpoint_jax.evaluation.evaluate import write_csv

    workdir = Path(workdir)
    targets = tuple(float(t) for t in config.time_to_accuracy.accuracy_targets)
    rows = []
    for setting in config.time_to_accuracy.training_settings:
        print(f"== {setting}", flush=True)
        log_rows = run_setting(setting_config(config, setting), workdir / setting)
        rows.append({"setting": setting, **summarize(log_rows, targets)})
    write_csv(rows, workdir / "time_to_accuracy.csv")
    report.write_json(workdir / "time_to_accuracy.json", rows)
    columns = [
        report.Column("setting", "setting"),
        report.Column("steps", "steps"),
        report.Column("final acc %", "final_top1_accuracy", ".2f"),
        report.Column("train s", "train_seconds", ".0f"),
        report.Column("compile s", "compile_seconds", ".0f"),
    ]
    columns += [report.Column(f"s to {t:g}%", f"seconds_to_{t:g}", ".0f") for t in targets]
    print(report.format_table(rows, columns))
    return rows
