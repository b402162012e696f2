"""Architectures: point placement and numbering, shapes, registry, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import AdaptivePool, Add, conv
from sdpoint_jax.core.pooling import adaptive_avg_pool, adaptive_max_pool
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import abstract_variables
from sdpoint_jax.models.preresnet import PreActBlock
from sdpoint_jax.models.resnet import PostActBlock
from tests.conftest import init_variables, random_variables, record_calls

SMALL_MODELS = [
    ("wrn-10-1", (16, 16)),
    ("densenet-bc-10-6", (16, 16)),
    ("vgg-11", (32, 32)),
    ("resnet-18", (64, 64)),
    ("preresnet-18", (64, 64)),
]


def _point_input_shapes(model, variables, x):
    """Per point, the shape of the full network's map there: the input the adaptive
    pool receives when that point is active (the same for every ratio)."""
    shapes = {}
    for point in range(1, model.num_points + 1):
        seen = set()
        for ratio in model.ratios:
            calls = record_calls(
                model, variables, x, Instance(point, ratio), AdaptivePool, abstract=True
            )
            assert len(calls) == 1, f"point {point}: expected exactly one pooling call"
            seen.add(calls[0])
        shapes[point] = seen
    return shapes


@pytest.mark.parametrize(("name", "hw"), SMALL_MODELS)
def test_every_point_pools_once_to_rounded_size(name, hw):
    model = create(name)
    variables = abstract_variables(model, hw)
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    assert record_calls(model, variables, x, Instance.full(), AdaptivePool, abstract=True) == []
    stem = model.__class__.__name__ in ("ResNet", "PreResNet")
    for point, seen in _point_input_shapes(model, variables, x).items():
        assert len({in_shape for in_shape, _ in seen}) == 1, (name, point)
        for in_shape, out_shape in seen:
            ratio = 0.5 if out_shape == min(o for _, o in seen) else 0.75
            size = in_shape[1:3]
            if point == 1 and stem:  # replaces the 3x3/2 max pool: ratio of its output
                size = tuple((s + 2 - 3) // 2 + 1 for s in size)
            expected_hw = tuple(round(ratio * s) for s in size)
            assert out_shape == (in_shape[0], *expected_hw, in_shape[3]), (name, point, ratio)


def test_point_counts_of_paper_architectures():
    assert create("wrn-28-10").num_points == 12
    assert create("wrn-40-4").num_points == 18
    assert create("densenet-bc-40-60").num_points == 12
    assert create("vgg-16").num_points == 13
    for name in ("preresnet-101", "resnext-101-32x4d"):
        assert create(name).num_points == 34
        assert create(name, stem_point=False).num_points == 33


def test_points_are_numbered_in_forward_order():
    model = create("wrn-16-1")  # points 1-2 at 16x16, 3-4 at 8x8... (n = 2 per stage)
    variables = abstract_variables(model, (32, 32))
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = {p: next(iter(s))[0] for p, s in _point_input_shapes(model, variables, x).items()}
    sizes = [shapes[p][1] for p in sorted(shapes)]
    assert sizes == [32, 32, 16, 16, 8, 8]
    channels = [shapes[p][3] for p in sorted(shapes)]
    assert channels == [16, 16, 32, 32, 64, 64]


def test_densenet_points_follow_concatenations_of_all_but_last_block():
    model = create("densenet-bc-10-6")  # 1 layer per block, growth 6: N = 2
    variables = abstract_variables(model, (16, 16))
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    shapes = {p: next(iter(s))[0] for p, s in _point_input_shapes(model, variables, x).items()}
    # point 1: stem (12 ch) + 6 = 18 at 16x16; point 2: transition (9 ch) + 6 = 15 at 8x8
    assert shapes == {1: (1, 16, 16, 18), 2: (1, 8, 8, 15)}


def _block_io(model, variables, x, instance, block_type):
    """(residual sum, block output) of the block ending at ``instance.point``."""
    sums = record_calls(model, variables, x, instance, Add, keep=lambda a, out: out)
    outs = record_calls(model, variables, x, instance, block_type, keep=lambda a, out: out)
    index = instance.point - int(model.stem_point)  # position among residual blocks
    return sums[index - 1], outs[index - 1]


def test_post_activation_point_is_before_final_relu():
    model = create("resnet-18")
    variables = random_variables(model, seed=0)
    x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    instance = Instance(3, 0.75)
    summed, out = _block_io(model, variables, x, instance, PostActBlock)
    expected = jax.nn.relu(adaptive_avg_pool(summed, (round(0.75 * 16),) * 2))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert float(summed.min()) < 0  # so ReLU-then-pool would differ


def test_pre_activation_point_is_right_after_addition():
    model = create("preresnet-18")
    variables = random_variables(model, seed=0)
    x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    summed, out = _block_io(model, variables, x, Instance(4, 0.5), PreActBlock)
    assert summed.shape == (1, 8, 8, 128)  # block 4 = first block of stage 2
    np.testing.assert_allclose(out, adaptive_avg_pool(summed, (4, 4)), atol=1e-6)


@pytest.mark.parametrize("size", [64, 96])
def test_imagenet_stem_point_is_adaptive_max_pool_of_maxpool_size(size):
    model = create("resnet-18")
    variables = random_variables(model, seed=0)
    x = jax.random.normal(jax.random.key(2), (1, size, size, 3))
    ((stem, pooled),) = record_calls(
        model, variables, x, Instance(1, 0.75), AdaptivePool, keep=lambda a, out: (a[0], out)
    )
    after_maxpool = size // 4  # conv 7x7/2 then max pool 3x3/2
    expected_hw = (round(0.75 * after_maxpool),) * 2
    assert stem.shape[1] == size // 2
    np.testing.assert_array_equal(pooled, adaptive_max_pool(stem, expected_hw))


def test_stem_point_can_be_turned_off():
    model = create("resnet-18", stem_point=False)
    variables = abstract_variables(model, (64, 64))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    ((in_shape, _),) = record_calls(
        model, variables, x, Instance(1, 0.5), AdaptivePool, abstract=True
    )
    assert in_shape == (1, 16, 16, 64)  # point 1 is now the first residual block


@pytest.mark.parametrize("hw", [(24, 24), (40, 28)])
def test_head_accepts_any_spatial_size(tiny_wrn, hw):
    model, variables = tiny_wrn
    logits = model.apply(variables, jnp.ones((3, *hw, 3)), instance=Instance(2, 0.75), train=False)
    assert logits.shape == (3, 10)
    assert logits.dtype == jnp.float32


def test_conv_pads_like_pytorch_on_even_inputs():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
    layer = conv(3, 3, 2)
    params = layer.init(jax.random.key(1), x)
    kernel = params["params"]["kernel"]
    expected = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(layer.apply(params, x), expected, atol=1e-6)


def test_invalid_instances_raise_clear_errors(tiny_wrn):
    model, variables = tiny_wrn
    x = jnp.ones((1, 16, 16, 3))
    with pytest.raises(ValueError, match=r"point 4 is out of range.*0\.\.3"):
        model.apply(variables, x, instance=Instance(4, 0.5), train=False)
    with pytest.raises(ValueError, match=r"ratio 0\.6 is not one of .*\(0\.5, 0\.75\)"):
        model.apply(variables, x, instance=Instance(2, 0.6), train=False)


def test_ratio_that_empties_a_map_is_rejected():
    model = create("vgg-11", ratios=(0.2, 0.5))
    variables = random_variables(model, seed=0, hw=(32, 32))
    with pytest.raises(ValueError, match=r"2x2 map at point 8 to 0x0"):
        model.apply(variables, jnp.ones((1, 32, 32, 3)), instance=Instance(8, 0.2), train=False)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("wrn-27-10", "6n \\+ 4"),
        ("densenet-bc-41-12", "6n \\+ 4"),
        ("vgg-12", "one of \\[11, 13, 16, 19\\]"),
        ("resnet-42", "one of \\[18, 34, 50, 101, 152, 200\\]"),
        ("resnext-18-32x4d", "depth >= 50"),
        ("mobilenet", "unknown model 'mobilenet'"),
    ],
)
def test_registry_rejects_bad_names(name, message):
    with pytest.raises(ValueError, match=message):
        create(name)


def test_bf16_compute_keeps_float32_params_and_logits(tiny_wrn):
    model = create("wrn-10-1", dtype=jnp.bfloat16)
    variables = init_variables(model, (16, 16))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    logits = model.apply(
        variables, jnp.ones((2, 16, 16, 3)), instance=Instance(1, 0.5), train=False
    )
    assert logits.dtype == jnp.float32
