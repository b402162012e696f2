"""Low mode (paper 003): kernel and input downsampling, the schedule, the models in low
mode, low-mode train steps, and exact resume of a run with low mode on."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sdpoint_jax.config import cifar_config
from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.layers import Pool, conv
from sdpoint_jax.core.lowmode import (
    DownsampledKernelConv,
    LowMode,
    downsample_images,
    downsample_kernel,
    kernel_pooling_matrix,
    low_kernel_size,
)
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_flops
from sdpoint_jax.training import parallel
from sdpoint_jax.training.checkpoint import CheckpointError
from sdpoint_jax.training.loop import train
from sdpoint_jax.training.run import Run, create_optimizer, initial_state
from sdpoint_jax.training.schedules import (
    LowModeSchedule,
    draw_instance,
    draw_step,
    low_mode_schedule,
)
from sdpoint_jax.training.steps import train_programs
from sdpoint_jax.training.trainee import SDPointTrainee
from sdpoint_jax.xla_cpu.conv_lowering import with_conv_lowering
from tests.conftest import losses, needs_cifar10, tiny_config

LOW = LowMode(2)


def _tree_equal(a, b) -> bool:
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --------------------------------------------------------------------------------------
# Kernel downsampling.


@pytest.mark.parametrize(
    ("kernel", "ratio", "size"),
    [(1, 2, 1), (3, 2, 1), (5, 2, 3), (7, 2, 3), (9, 2, 5), (11, 2, 5), (3, 3, 1), (7, 3, 3)],
)
def test_downsampled_kernel_sizes(kernel, ratio, size):
    assert low_kernel_size(kernel, ratio) == size
    assert size in (-(-kernel // ratio), kernel // ratio)  # ceil(K/r) or floor(K/r)
    assert size % 2 == 1  # odd: K' // 2 padding keeps the map size


def test_three_by_three_kernel_becomes_the_mean_of_its_taps():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
    small = downsample_kernel(kernel, 2)
    assert small.shape == (1, 1, 4, 5)
    np.testing.assert_allclose(small[0, 0], kernel.mean(axis=(0, 1)), rtol=1e-6, atol=1e-7)
    tiny = jnp.arange(9.0).reshape(3, 3, 1, 1)  # taps 0..8: mean 4
    assert float(downsample_kernel(tiny, 2).squeeze()) == pytest.approx(4.0)


def test_five_and_seven_tap_kernels_by_hand():
    # 5x5, r = 2 -> 3x3: 2x2 windows with stride 2, the padded tap at the end left out
    five = np.arange(25.0, dtype=np.float32).reshape(5, 5)
    groups5 = [[0, 1], [2, 3], [4]]
    expected5 = [[five[np.ix_(rows, cols)].mean() for cols in groups5] for rows in groups5]
    got5 = downsample_kernel(jnp.asarray(five)[:, :, None, None], 2)[:, :, 0, 0]
    np.testing.assert_allclose(got5, expected5, rtol=1e-6)
    assert got5[2, 2] == five[4, 4] and got5[0, 0] == (0 + 1 + 5 + 6) / 4
    # 7x7, r = 2: ceil(7/2) = 4 is even, so floor: 3x3 pooling with stride 2
    seven = np.arange(49.0, dtype=np.float32).reshape(7, 7) ** 2
    groups7 = [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    expected7 = [[seven[np.ix_(rows, cols)].mean() for cols in groups7] for rows in groups7]
    got7 = downsample_kernel(jnp.asarray(seven)[:, :, None, None], 2)[:, :, 0, 0]
    np.testing.assert_allclose(got7, expected7, rtol=1e-6)
    # 7x7, r = 3: ceil(7/3) = 3 is odd: windows {0,1,2}, {3,4,5}, {6}
    np.testing.assert_array_equal(
        kernel_pooling_matrix(7, 3) > 0,
        [[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1]],
    )


def _conv_loss(kernel: jax.Array, x: jax.Array, ratio: int) -> jax.Array:
    y = DownsampledKernelConv(ratio)(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC)
    return jnp.sum(jnp.sin(y) * y)


_NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_kernel_gradient_reaches_every_tap_of_the_full_kernel(kernel_size):
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2))
    kernel = 0.3 * jax.random.normal(jax.random.key(2), (kernel_size, kernel_size, 2, 3))
    grad = jax.grad(_conv_loss)(kernel, x, 2)
    # analytic (paper Eq. 4): dL/dF = A^T (dL/dF') A, dL/dF' from the small kernel
    small = downsample_kernel(kernel, 2)
    pads = [(small.shape[0] // 2,) * 2] * 2

    def small_loss(small):
        y = lax.conv_general_dilated(x, small, (1, 1), pads, dimension_numbers=_NHWC)
        return jnp.sum(jnp.sin(y) * y)

    pool = kernel_pooling_matrix(kernel_size, 2)
    expected = np.einsum("ik,jl,ijcn->klcn", pool, pool, jax.grad(small_loss)(small))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(grad) > 0)  # every full-size tap learns
    if kernel_size == 3:  # the 1x1 mean: every tap gets 1/9 of the small kernel's gradient
        np.testing.assert_allclose(grad, np.broadcast_to(grad[:1, :1], grad.shape), rtol=1e-5)
    # finite differences on a few taps
    eps = 1e-2
    for tap in [(0, 0, 0, 0), (1, 2, 1, 2), (kernel_size - 1, kernel_size - 1, 0, 1)]:
        step = jnp.zeros_like(kernel).at[tap].set(eps)
        numeric = (_conv_loss(kernel + step, x, 2) - _conv_loss(kernel - step, x, 2)) / (2 * eps)
        assert float(numeric) == pytest.approx(float(grad[tap]), rel=2e-2, abs=1e-3)


@pytest.mark.parametrize(("kernel_size", "stride"), [(3, 1), (3, 2), (5, 1)])
def test_low_mode_conv_module_runs_the_pooled_kernel(kernel_size, stride):
    layer = conv(4, kernel_size, stride, kernel_ratio=2)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    variables = layer.init(jax.random.key(4), x)
    assert variables["params"]["kernel"].shape == (kernel_size, kernel_size, 3, 4)
    small = downsample_kernel(variables["params"]["kernel"], 2)
    pad = small.shape[0] // 2
    expected = lax.conv_general_dilated(
        x, small, (stride, stride), [(pad, pad)] * 2, dimension_numbers=_NHWC
    )
    out = layer.apply(variables, x)
    assert out.shape == (2, 8 // stride, 8 // stride, 4)  # same map size as full mode
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_low_mode_conv_gradients_agree_across_lowerings():
    # 32 channels on 32x32: large enough for the matrix-product kernel gradient
    x = jax.random.normal(jax.random.key(7), (2, 32, 32, 32))
    kernel = 0.1 * jax.random.normal(jax.random.key(8), (3, 3, 32, 32))

    def loss(kernel, x):
        conv = DownsampledKernelConv(2)
        return jnp.sum(jnp.tanh(conv(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC)))

    grad_fn = jax.grad(loss, argnums=(0, 1))
    grads = {
        lowering: with_conv_lowering(grad_fn, lowering)(kernel, x)
        for lowering in ("xla", "matmul_grad")
    }
    for xla, matmul in zip(grads["xla"], grads["matmul_grad"], strict=True):
        np.testing.assert_allclose(matmul, xla, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Input downsampling.


@pytest.mark.parametrize("resize", ["gaussian", "bilinear"])
def test_downsampled_images_keep_constants_and_halve_the_size(resize):
    images = jnp.full((2, 32, 32, 3), 1.7)
    out = downsample_images(images, LowMode(2, resize))
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(out, 1.7, rtol=1e-6)
    assert downsample_images(jnp.zeros((1, 24, 12, 3)), LowMode(3, resize)).shape == (1, 8, 4, 3)


def test_bilinear_ratio_two_is_the_block_mean():
    images = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
    blocks = images.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(
        downsample_images(images, LowMode(2, "bilinear")), blocks, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("ratio", [2, 3])
def test_gaussian_decimation_samples_block_centres_without_shift(ratio):
    # a linear ramp is reproduced exactly at the block centres r*i + (r-1)/2 away from
    # the borders (symmetric weights), so the image is not shifted
    size = 12 * ratio
    ramp = jnp.arange(size, dtype=jnp.float32)
    images = jnp.broadcast_to(ramp[None, :, None, None], (1, size, size, 1))
    out = np.asarray(downsample_images(images, LowMode(ratio)))[0, :, 0, 0]
    centres = ratio * np.arange(12) + (ratio - 1) / 2
    np.testing.assert_allclose(out[3:-3], centres[3:-3], rtol=1e-5)
    # blurred: a checkerboard (the highest frequency) loses most of its amplitude
    checker = (-1.0) ** (np.arange(size)[:, None] + np.arange(size)[None, :])
    blurred = downsample_images(jnp.asarray(checker, jnp.float32)[None, :, :, None], LowMode(2))
    assert float(jnp.abs(blurred[0, 4:-4, 4:-4]).max()) < 0.2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LowMode(1), "integer >= 2, got 1"),
        (lambda: LowMode(2.5), "integer >= 2, got 2.5"),
        (lambda: LowMode(True), "integer >= 2, got True"),
        (lambda: LowMode(2, "nearest"), "one of ('gaussian', 'bilinear'), got 'nearest'"),
        (lambda: downsample_images(jnp.zeros((1, 30, 30, 3)), LowMode(4)), "divide.*30x30"),
        (lambda: low_kernel_size(4, 2), "odd integer >= 1, got 4"),
    ],
)
def test_bad_low_mode_values_are_value_errors(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


# --------------------------------------------------------------------------------------
# Models in low mode.


def _conv_calls(model, variables, x, low_mode):
    """(module path, uses a downsampled kernel, output shape) of every convolution, and
    how many fixed pooling layers ran."""
    calls, pools = [], []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Conv):
            low = isinstance(context.module.conv_general_dilated, DownsampledKernelConv)
            calls.append(("/".join(context.module.path), low, out.shape))
        if context.method_name == "__call__" and isinstance(context.module, Pool):
            pools.append(out.shape)
        return out

    mode = {} if low_mode is None else {"low_mode": low_mode}
    apply = functools.partial(
        model.apply, instance=Instance.full(), train=True, mutable=["batch_stats"], **mode
    )
    with nn.intercept_methods(interceptor):
        logits, _ = jax.eval_shape(apply, variables, x)
    return calls, pools, logits.shape


def _abstract_variables(model, hw):
    return jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, instance=Instance.full(), train=False),
        jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32),
    )


def test_wrn_low_mode_shapes_and_downsampled_layers():
    model = create("wrn-10-1")
    variables = _abstract_variables(model, (32, 32))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    full, _, full_logits = _conv_calls(model, variables, x, None)
    low, _, low_logits = _conv_calls(model, variables, x, LOW)
    assert full_logits == low_logits == (2, 10)
    assert [path for path, _, _ in full] == [path for path, _, _ in low]
    for (path, _, full_shape), (_, _, low_shape) in zip(full, low, strict=True):
        assert low_shape == (2, full_shape[1] // 2, full_shape[2] // 2, full_shape[3]), path
    downsampled = [path for path, is_low, _ in low if is_low]
    assert downsampled == [f"block{b}/conv{c}" for b in (1, 2, 3) for c in (1, 2)]
    assert not any(is_low for _, is_low, _ in full)


@pytest.mark.parametrize(
    ("name", "blocks", "convs"),
    [("resnet-18", 8, ("conv1", "conv2")), ("resnet-50", 16, ("conv2",))],
)
def test_resnet_low_mode_downsamples_the_block_three_by_threes_and_drops_the_max_pool(
    name, blocks, convs
):
    model = create(name)
    variables = _abstract_variables(model, (64, 64))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    full, full_pools, _ = _conv_calls(model, variables, x, None)
    low, low_pools, logits = _conv_calls(model, variables, x, LOW)
    assert logits == (2, 10)
    assert len(full_pools) == 1 and low_pools == []  # stem max pool: full mode only
    downsampled = [path for path, is_low, _ in low if is_low]
    assert downsampled == [f"block{b}/{c}" for b in range(2, blocks + 2) for c in convs]
    # the stem runs on the 32x32 input; without the max pool the blocks see the
    # full-mode sizes (paper 003, Sect. 4, item 5)
    assert low[0][2][1:3] == (16, 16) and full[0][2][1:3] == (32, 32)
    assert [shape for _, _, shape in low[1:]] == [shape for _, _, shape in full[1:]]


def test_parameters_are_identical_in_both_modes_and_low_mode_keeps_bn_statistics(tiny_wrn):
    model, variables = tiny_wrn
    x = jax.random.normal(jax.random.key(6), (2, 16, 16, 3))
    modes = {"full": None, "low": LOW}

    def init(low_mode):
        mode = {} if low_mode is None else {"low_mode": low_mode}
        init = functools.partial(model.init, instance=Instance.full(), train=False, **mode)
        return jax.eval_shape(init, jax.random.key(0), x)

    # the same variables (names, shapes, dtypes) whichever mode creates them
    assert init(None) == init(LOW)

    @functools.partial(jax.jit, static_argnames="low_mode")
    def loss_and_stats(params, batch_stats, low_mode):
        mode = {} if low_mode is None else {"low_mode": low_mode}
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            instance=Instance.full(),
            train=True,
            mutable=["batch_stats"],
            **mode,
        )
        return jnp.mean(logits**2), updates["batch_stats"]

    params, stats = variables["params"], variables["batch_stats"]
    grad_fn = jax.jit(jax.grad(loss_and_stats, has_aux=True), static_argnames="low_mode")
    grads, new_stats = {}, {}
    for name, mode in modes.items():
        grads[name], new_stats[name] = grad_fn(params, stats, low_mode=mode)
    assert _tree_equal(new_stats["low"], stats)  # running statistics untouched
    assert not _tree_equal(new_stats["full"], stats)
    assert jax.tree.structure(grads["low"]) == jax.tree.structure(params)
    kernel_grad = grads["low"]["block2"]["conv1"]["kernel"]  # 3x3 -> 1x1: equal taps
    np.testing.assert_allclose(
        kernel_grad, jnp.broadcast_to(kernel_grad[:1, :1], kernel_grad.shape), rtol=1e-5
    )
    assert float(jnp.abs(kernel_grad).max()) > 0
    full_grad = grads["full"]["block2"]["conv1"]["kernel"]
    assert not np.allclose(full_grad, jnp.broadcast_to(full_grad[:1, :1], full_grad.shape))


def test_low_mode_flops_and_unsupported_architectures():
    model = create("wrn-10-1")
    full = count_flops(model, Instance.full(), (32, 32))
    low = count_flops(model, Instance.full(), (32, 32), low_mode=LOW)
    at_16 = count_flops(model, Instance.full(), (16, 16))
    assert low < at_16 < full  # smaller maps, and the block convs lose 8 of 9 taps
    densenet = create("densenet-bc-10-6")
    with pytest.raises(ValueError, match="DenseNetBC has no low mode"):
        count_flops(densenet, Instance.full(), (32, 32), low_mode=LOW)


# --------------------------------------------------------------------------------------
# Schedule.


def _schedule(probability, **kwargs) -> LowModeSchedule:
    settings = {"num_epochs": 10, "steps_per_epoch": 2000, **kwargs}
    return LowModeSchedule.create(LOW, probability, **settings)


def test_draw_is_a_pure_function_of_seed_and_step():
    schedule = _schedule(0.5)
    steps = list(range(300))
    forward = [schedule.is_low(7, s) for s in steps]
    backward = [schedule.is_low(7, s) for s in reversed(steps)][::-1]
    assert forward == backward == [_schedule(0.5).is_low(7, s) for s in steps]
    assert forward != [schedule.is_low(8, s) for s in steps]
    assert 100 < sum(forward) < 200


def test_low_mode_fraction_is_near_p_per_epoch():
    constant = _schedule(0.3, num_epochs=1, steps_per_epoch=20000)
    fraction = np.mean([constant.is_low(0, s) for s in range(20000)])
    assert abs(fraction - 0.3) < 0.015  # 4.6 standard deviations
    per_epoch = _schedule((0.0, 0.5, 1.0), num_epochs=3, steps_per_epoch=4000)
    draws = np.array([per_epoch.is_low(1, s) for s in range(12000)]).reshape(3, 4000)
    assert draws[0].sum() == 0 and draws[2].all()
    assert abs(draws[1].mean() - 0.5) < 0.035


def test_full_mode_is_forced_after_each_learning_rate_drop():
    schedule = _schedule(1.0, steps_per_epoch=7, lr_drop_epochs=(3, 6.5), full_epochs_after_drop=2)
    full_steps = [s for s in range(70) if not schedule.is_low(0, s)]
    # drops at steps 21 and round(45.5) = 46, as the learning-rate schedule puts them
    assert full_steps == list(range(21, 35)) + list(range(46, 60))
    assert schedule.probability(20) == 1.0 and schedule.probability(21) == 0.0
    no_window = _schedule(1.0, steps_per_epoch=7, lr_drop_epochs=(3,), full_epochs_after_drop=0)
    assert all(no_window.is_low(0, s) for s in range(70))


def test_steps_are_low_mode_or_the_instance_drawn_without_low_mode():
    space = InstanceSpace(3)
    schedule = _schedule(0.5)
    keys = [draw_step(space, 3, s, True, schedule) for s in range(200)]
    low = [s for s, key in enumerate(keys) if key == LOW]
    assert 60 < len(low) < 140
    for step, key in enumerate(keys):
        if key != LOW:
            assert key == draw_instance(space, 3, step, True)
    assert [draw_step(space, 3, s, True, None) for s in range(50)] == [
        draw_instance(space, 3, s, True) for s in range(50)
    ]
    assert {draw_step(space, 3, s, False, schedule) for s in range(50)} == {Instance.full(), LOW}


def test_schedule_from_config():
    config = cifar_config("wrn-10-1", "cifar10")
    assert low_mode_schedule(config, steps_per_epoch=10) is None  # default: off
    config.low_mode.prob = 0.5
    schedule = low_mode_schedule(config, steps_per_epoch=10)
    assert schedule.mode == LowMode(2, "gaussian")
    assert schedule.full_windows == ((2000, 2040), (3000, 3040))  # 4 epochs after 200, 300
    config.low_mode.epoch_probs = (0.5,) * 400
    with pytest.raises(ValueError, match=r"either low_mode\.prob"):
        low_mode_schedule(config, steps_per_epoch=10)
    config.low_mode.prob = 0.0
    assert low_mode_schedule(config, steps_per_epoch=10).epoch_probabilities == (0.5,) * 400
    config.low_mode.epoch_probs = (0.5,) * 3
    with pytest.raises(ValueError, match="got 3, expected one per epoch"):
        low_mode_schedule(config, steps_per_epoch=10)


@pytest.mark.parametrize(
    ("probability", "message"),
    [
        (1.5, r"low-mode probability must lie in \[0, 1\], got 1.5"),
        (-0.1, r"must lie in \[0, 1\], got -0.1"),
        (float("nan"), r"must lie in \[0, 1\], got nan"),
        ((0.2,) * 9 + (1.2,), r"probability of epoch 9 must lie in \[0, 1\], got 1.2"),
    ],
)
def test_bad_probabilities_are_value_errors(probability, message):
    with pytest.raises(ValueError, match=message):
        _schedule(probability)


def test_bad_schedule_settings_are_value_errors():
    with pytest.raises(ValueError, match="must be a number >= 0, got -1"):
        _schedule(0.5, full_epochs_after_drop=-1)
    with pytest.raises(ValueError, match="epoch 10; the schedule has 10 epochs"):
        _schedule(0.5).probability(20000)
    config = cifar_config("wrn-10-1", "cifar10")
    config.low_mode.prob = 2.0
    with pytest.raises(ValueError, match=r"low_mode.prob must lie in \[0, 1\], got 2.0"):
        low_mode_schedule(config, steps_per_epoch=10)


# --------------------------------------------------------------------------------------
# Training.


def test_train_programs_are_keyed_by_instance_or_low_mode():
    model = create("wrn-10-1")
    tx = create_optimizer(tiny_config(1), steps_per_epoch=1000)
    mesh = parallel.create_mesh()
    trainee = SDPointTrainee(model)
    state = parallel.replicate(initial_state(trainee, tx, 16, seed=0), mesh)
    programs = train_programs(trainee, tx, state, mesh, 4, 16, conv_lowering="xla")
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch(
        {
            "image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 4).astype(np.int32),
        },
        mesh,
    )
    before = jax.device_get(state)
    low_state, metrics = programs[LOW](state, batch)
    low_state = jax.device_get(low_state)
    assert np.isfinite(float(metrics["loss"]))
    assert _tree_equal(low_state.batch_stats, before.batch_stats)
    assert not _tree_equal(low_state.params, before.params)
    assert jax.tree.structure(low_state.params) == jax.tree.structure(before.params)
    full_state, _ = programs[Instance.full()](parallel.replicate(before, mesh), batch)
    assert not _tree_equal(jax.device_get(full_state).batch_stats, before.batch_stats)
    assert len(programs) == 2


def low_mode_config(max_steps: int):
    config = tiny_config(max_steps)
    config.low_mode.prob = 0.5  # seed 0: low, 2:0.75, low, 2:0.75, low, 2:0.5
    return config


@pytest.mark.slow
@needs_cifar10
def test_resume_with_low_mode_repeats_the_uninterrupted_run_exactly(tmp_path_factory):
    reference_dir, resumed_dir = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("res")
    reference = train(low_mode_config(6), reference_dir, resume=False)
    train(low_mode_config(3), resumed_dir, resume=False)
    resumed = train(low_mode_config(6), resumed_dir, resume=True)
    assert losses(resumed_dir) == losses(reference_dir)
    kinds = [kind for _, _, kind in losses(resumed_dir)]
    assert kinds == ["low:2", "2:0.75", "low:2", "2:0.75", "low:2", "2:0.5"]
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, draws = Run.create(low_mode_config(6), resumed_dir).restore()
    assert {k: int(v) for k, v in draws.items() if v} == {"low:2": 3, "2:0.75": 2, "2:0.5": 1}


@needs_cifar10
def test_checkpoints_from_before_low_mode_resume_and_low_mode_settings_are_invariant(tmp_path):
    run = Run.create(tiny_config(3), tmp_path)
    old_config = {k: v for k, v in tiny_config(3).to_dict().items() if k != "low_mode"}
    assert "low_mode" not in old_config and "optim" in old_config
    with run.checkpoints() as manager:
        checkpoint = {"state": run.initial_state(), "draws": run.initial_draws()}
        manager.save(3, checkpoint, config=old_config, force=True)
    state, draws = run.restore()  # written with the defaults, which this config keeps
    assert int(state.step) == 0 and "low:2" not in draws
    changed = tiny_config(3)
    changed.low_mode.ratio = 4
    with pytest.raises(CheckpointError, match=r"different config \(low_mode\.ratio: 2 -> 4\)"):
        Run.create(changed, tmp_path).restore()
