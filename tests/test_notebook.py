"""experiments/colab.ipynb runs top to bottom under ``jupyter nbconvert --execute``.

The notebook runs in its ``tiny`` setting (a seconds-scale run of WRN-10-1 with the ratio
0.5 only, 4 instances, on 256 CIFAR-10 images) on the real data set, writing its run
directory under ``tmp_path``; the test checks that every cell ran, that the run's
artefacts exist and that the notebook shows them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sdpoint_jax.models import create
from tests.conftest import SHARED_DATA_DIR, needs_cifar10

pytestmark = pytest.mark.first

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab.ipynb"


def _output_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def _images(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


@needs_cifar10
def test_notebook_runs_top_to_bottom_in_the_tiny_setting(tmp_path):
    workdir = tmp_path / "run"
    executed = tmp_path / "colab.ipynb"
    env = {
        **os.environ,
        "SDPOINT_NOTEBOOK_SETTING": "tiny",
        "SDPOINT_DATA_DIR": str(SHARED_DATA_DIR),
        "SDPOINT_NOTEBOOK_WORKDIR": str(workdir),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    env.pop("SDPOINT_JAX_REPO", None)
    command = [
        sys.executable,
        "-m",
        "nbconvert",
        "--to",
        "notebook",
        "--execute",
        "--ExecutePreprocessor.timeout=900",
        "--ExecutePreprocessor.kernel_name=python3",
        "--output-dir",
        str(tmp_path),
        "--output",
        executed.name,
        str(NOTEBOOK),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-5000:]

    notebook = nbformat.read(executed, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [
        output for cell in code_cells for output in cell.outputs if output["output_type"] == "error"
    ]
    assert not errors
    assert all(cell.execution_count for cell in code_cells)
    text = "\n".join(_output_text(cell) for cell in code_cells)

    # one row per instance and BN mode
    space = create("wrn-10-1", num_classes=10, ratios=(0.5,)).space  # the tiny setting's
    expected = {(mode, str(instance)) for mode in ("instance", "uniform") for instance in space}
    with open(workdir / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    names = {
        (
            row["bn_mode"],
            "full" if int(row["point"]) == 0 else f"{row['point']}:{float(row['ratio']):g}",
        )
        for row in rows
    }
    assert len(rows) == len(expected) and names == expected
    assert all(int(row["examples"]) == 256 for row in rows)
    assert (workdir / "cost_error.png").is_file()
    latency = json.loads((workdir / "latency.json").read_text())
    assert sorted(row["instance"] for row in latency) == sorted(str(i) for i in space)
    assert all(row["batch"] == 1 for row in latency)
    manifest = json.loads((workdir / "export" / "manifest.json").read_text())
    assert [entry["name"] for entry in manifest["instances"]] == ["full"]

    # the notebook shows the commands, the tables, the plots and the export's check
    for shown in (
        "$ python -m sdpoint_jax.main all --config experiments/configs/cifar10_quick.py",
        "--config.model.name=wrn-10-1",
        f"results.csv: {len(expected)} rows, 256 test images",
        "$ python -m sdpoint_jax.main select",
        "$ python -m sdpoint_jax.bench latency --model wrn-10-1 --instances ",
        "batch 1: measured latency and test error of each instance",
        "$ python -m sdpoint_jax.export",
        "manifest.json",
        "exported instances: ('full',)",
        "instance full on 256 test images",
        "same prediction on",
    ):
        assert shown in text, shown
    first_words = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert {str(instance) for instance in space} <= first_words  # the tables' rows
    assert sum(_images(cell) for cell in code_cells) >= 3  # cost-error, latency, predictions
