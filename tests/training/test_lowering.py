"""Every train, evaluation and calibration program of a tiny model, and its ``jax.export``
artifacts, lower (not compile) for GPU and TPU from this CPU-only machine: XLA's
convolutions there, bfloat16 compute, the batch split over the mesh's ``"data"`` axis."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.data.specs import dataset_spec
from sdpoint_jax.deploy.artifacts import export_instance, export_switchable
from sdpoint_jax.evaluation.calibrate import _batch_moments_fn
from sdpoint_jax.evaluation.evaluate import _counts_fn
from sdpoint_jax.models import create
from sdpoint_jax.training import parallel
from sdpoint_jax.training.run import create_optimizer, initial_state
from sdpoint_jax.training.steps import UPDATE_KEY, train_programs
from sdpoint_jax.training.trainee import SDPointTrainee
from sdpoint_jax.xla_cpu.conv_lowering import resolve_conv_lowering
from tests.conftest import HW, random_variables, tiny_config

PLATFORMS = ("cuda", "tpu")
DEVICES = 4
BATCH = 8
MESH = AbstractMesh((DEVICES,), (parallel.DATA_AXIS,))
CONVOLUTION = "stablehlo.convolution"


def arguments(text: str) -> list[str]:
    """The argument declarations of the lowered module's ``main``."""
    signature = next(line for line in text.splitlines() if "func.func public @main" in line)
    return re.findall(r"%arg\d+: tensor<[^>]*>[^%]*", signature.split(") ->")[0])


REPLICATED = re.compile(r"#sdy.sharding<@mesh, \[(\{\}(, \{\})*)?\]>")
SPLIT = re.compile(r'#sdy.sharding<@mesh, \[\{"data"\}(, \{\})*\]>')


def assert_data_parallel(text: str, sharded: int) -> None:
    """The program spans the mesh's devices; exactly ``sharded`` arguments (the batch,
    leading dimension ``BATCH``) are split on ``"data"`` along their leading axis, and
    every other one is replicated."""
    assert f"mhlo.num_partitions = {DEVICES}" in text
    split = [arg for arg in arguments(text) if SPLIT.search(arg)]
    assert len(split) == sharded, split
    assert all(re.search(rf"tensor<{BATCH}x", arg) for arg in split)
    assert all(REPLICATED.search(arg) for arg in arguments(text) if arg not in split)


@pytest.fixture(scope="module")
def trainee_state():
    """An SDPoint trainee of WRN-10-1 in float32 and bfloat16, with abstract states."""
    tx = create_optimizer(tiny_config(1), steps_per_epoch=1000)
    made = {}
    for dtype in ("float32", "bfloat16"):
        trainee = SDPointTrainee(create("wrn-10-1", num_classes=10, dtype=jnp.dtype(dtype)))
        state = jax.eval_shape(lambda t=trainee: initial_state(t, tx, HW[0], seed=0))
        made[dtype] = (trainee, tx, state)
    return made


def programs(trainee_state, dtype: str, conv_lowering: str, platform: str):
    trainee, tx, state = trainee_state[dtype]
    return train_programs(
        trainee, tx, state, MESH, BATCH, HW[0], conv_lowering=conv_lowering, platform=platform
    )


def test_every_train_program_lowers_for_gpu_and_tpu_with_xla_convolutions(trainee_state):
    trainee = trainee_state["float32"][0]
    keys = list(trainee.program_keys())
    assert len(keys) == 2 * trainee.model.num_points + 1
    for platform in PLATFORMS:  # auto is XLA's convolutions off CPU
        assert resolve_conv_lowering("auto", platform) == "xla"
    auto = programs(trainee_state, "float32", "auto", "cuda")
    for key in keys:
        traced = auto.gradients.trace(key)
        for platform in PLATFORMS:
            text = traced.lower(lowering_platforms=(platform,)).as_text()
            assert_data_parallel(text, sharded=2)  # images and labels
    update = auto.update.trace(UPDATE_KEY)
    for platform in PLATFORMS:
        assert_data_parallel(update.lower(lowering_platforms=(platform,)).as_text(), sharded=0)
    # the last instance, against the explicit lowerings: CPU's auto computes gradients
    # from patch matrices, with fewer XLA convolutions
    xla = programs(trainee_state, "float32", "xla", "cuda").gradients.trace(keys[-1])
    assert xla.lower(lowering_platforms=("tpu",)).as_text() == text
    cpu = programs(trainee_state, "float32", "auto", "cpu").gradients.trace(keys[-1])
    cpu_text = cpu.lower(lowering_platforms=("cpu",)).as_text()
    assert 0 < cpu_text.count(CONVOLUTION) < text.count(CONVOLUTION)


def test_bfloat16_train_steps_lower_for_gpu_and_tpu(trainee_state):
    trainee = trainee_state["bfloat16"][0]
    for platform in PLATFORMS:
        gradients = programs(trainee_state, "bfloat16", "auto", platform).gradients
        for key in (Instance(1, 0.5),):
            text = gradients.trace(key).lower(lowering_platforms=(platform,)).as_text()
            convolutions = [line for line in text.splitlines() if CONVOLUTION in line]
            assert convolutions and all("bf16" in line for line in convolutions)
            assert_data_parallel(text, sharded=2)
    assert trainee.model.dtype == jnp.bfloat16


def test_evaluation_and_calibration_programs_lower_for_gpu_and_tpu():
    model = create("wrn-10-1", num_classes=10)
    variables = jax.eval_shape(lambda: random_variables(model, 0))
    replicated = NamedSharding(MESH, PartitionSpec())
    split = NamedSharding(MESH, PartitionSpec(parallel.DATA_AXIS))
    variables = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), variables
    )
    images = jax.ShapeDtypeStruct((BATCH, *HW, 3), jnp.float32, sharding=split)
    batch = {
        "image": images,
        "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=split),
        "mask": jax.ShapeDtypeStruct((BATCH,), jnp.float32, sharding=split),
    }
    counts = _counts_fn(model)
    moments = _batch_moments_fn(model, variables["batch_stats"])
    for instance in model.space:
        evaluation = counts.trace(variables, batch, instance=instance)
        calibration = moments.trace(variables["params"], images, instance=instance)
        for platform in PLATFORMS:
            assert_data_parallel(evaluation.lower(lowering_platforms=(platform,)).as_text(), 3)
            text = calibration.lower(lowering_platforms=(platform,)).as_text()
            assert_data_parallel(text, 1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_artifacts_lower_for_gpu_and_tpu(dtype: str):
    model = create("wrn-10-1", num_classes=10, dtype=jnp.dtype(dtype))
    variables = random_variables(model, 0)
    spec = dataset_spec("cifar10")
    instances = list(model.space)
    exported = [export_switchable(model, variables, instances, spec, PLATFORMS)]
    if dtype == "float32":
        exported.append(export_instance(model, variables, Instance(2, 0.75), spec, PLATFORMS))
    for artifact in exported:
        assert artifact.platforms == PLATFORMS
        text = artifact.mlir_module()
        assert CONVOLUTION in text
        assert ("bf16" in text) == (dtype == "bfloat16")
