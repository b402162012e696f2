"""Runs a whole comparison: train and evaluate each method (at each seed), then write
the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
from tqdm.auto import tqdm

from sdpoint_jax.compare.method import Method
from sdpoint_jax.compare.registry import build_method
from sdpoint_jax.compare.report import COMPARE_CSV, COMPARE_PNG, plot_compare
from sdpoint_jax.compare.study import write_study
from sdpoint_jax.compare.trainer import Row, evaluate_method, train_method
from sdpoint_jax.config import get_field
from sdpoint_jax.evaluation.evaluate import write_csv
from sdpoint_jax.training import parallel

ROWS_JSON = "rows.json"


def seed_directory(workdir: str | Path, seed: int) -> Path:
    """Where the methods of ``seed`` run when ``config.compare.seeds`` is set."""
    return Path(workdir) / f"seed_{seed}"


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One method trained at one seed: ``config`` (its ``seed`` set) and ``directory``;
    ``seed`` is None for a comparison without ``config.compare.seeds``."""

    method: Method
    config: ml_collections.ConfigDict
    directory: Path
    seed: int | None


def plan_runs(config: ml_collections.ConfigDict, workdir: str | Path) -> list[MethodRun]:
    """Every (method, seed) run of ``config``, in order, each method built (its name
    checked) before anything is trained.

    Without ``config.compare.seeds`` every method runs once, seeded by ``config.seed``,
    in ``workdir/<method>``. With it, method ``m`` runs at seed ``k`` in
    ``workdir/seed_<k>/<m>``, at every seed, or at ``seeds[0]`` only for the methods of
    ``config.compare.single_seed_methods``.

    Raises:
      ValueError: an unknown method, seeds that are not distinct integers >= 0, or a
        single-seed method that is not one of ``config.compare.methods``.
    """
    workdir = Path(workdir)
    names = tuple(config.compare.methods)
    seeds = config.compare.seeds
    if seeds is None:
        return [
            MethodRun(build_method(name, config), config, workdir / name, None) for name in names
        ]
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"compare.seeds must be distinct integers >= 0, got {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"compare.seeds must be distinct integers >= 0, got {seeds!r}")
    single = tuple(config.compare.single_seed_methods)
    unknown = sorted(set(single) - set(names))
    if unknown:
        raise ValueError(
            f"compare.single_seed_methods {unknown} are not in compare.methods {list(names)}"
        )
    runs = []
    for seed in seeds:
        seeded = ml_collections.ConfigDict(config.to_dict())
        seeded.seed = seed
        for name in names:
            if seed == seeds[0] or name not in single:
                directory = seed_directory(workdir, seed) / name
                runs.append(MethodRun(build_method(name, seeded), seeded, directory, seed))
    return runs


def _plot_title(config: ml_collections.ConfigDict, methods: list[Method]) -> str:
    """The networks behind the curves and the data set: ``config.model.name`` and every
    other network a method's :attr:`~Method.architecture` names (``compare.msdnet``
    where MSDNet ran)."""
    fields = ["model.name", *(path for method in methods for path in method.architecture)]
    networks = dict.fromkeys(get_field(config, path) for path in fields if path != "data.dataset")
    return f"{' and '.join(networks)} on {config.data.dataset}"


def run_comparison(config: ml_collections.ConfigDict, workdir: str | Path) -> list[Row]:
    """Trains and evaluates every run of :func:`plan_runs` in ``workdir``.

    Rows of each run are also kept in ``<its directory>/rows.json`` (with a ``seed``
    field when ``config.compare.seeds`` is set), so a rerun after an interruption neither
    retrains nor re-evaluates finished runs; an interrupted one resumes from its
    checkpoint. With ``config.compare.seeds`` and ``config.compare.monitor`` the study
    report is written too (:mod:`sdpoint_jax.compare.study`: ``study.json``,
    ``study.csv``, ``study_curves.png``).
    """
    workdir = Path(workdir)
    runs = plan_runs(config, workdir)
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.optim.batch_size, mesh)
    rows: list[Row] = []
    for run in runs:
        label = run.method.name if run.seed is None else f"{run.method.name} (seed {run.seed})"
        done = run.directory / ROWS_JSON
        if done.is_file():
            tqdm.write(f"{label}: already evaluated ({done})")
            rows += json.loads(done.read_text())
            continue
        variables = train_method(run.method, run.config, run.directory, mesh)
        method_rows = evaluate_method(run.method, variables, run.config, mesh)
        if run.seed is not None:
            method_rows = [{**row, "seed": run.seed} for row in method_rows]
        done.write_text(json.dumps(method_rows, indent=1) + "\n")
        rows += method_rows
    write_csv(rows, workdir / COMPARE_CSV)
    plot_compare(
        rows, workdir / COMPARE_PNG, title=_plot_title(config, [run.method for run in runs])
    )
    if config.compare.seeds is not None and config.compare.monitor:
        directories = {(run.method.name, run.seed): run.directory for run in runs}
        write_study(config, workdir, rows, directories)
    for row in rows:
        seed = "" if "seed" not in row else f" seed {row['seed']}"
        tqdm.write(
            f"{row['curve']:>22} {row['setting']:>14} {row['gflops']:8.4f} GFLOPs "
            f"{row['top1_error']:6.2f}% error{seed}"
        )
    return rows
