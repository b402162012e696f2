"""Instance-keyed batch norm: which keys exist, which are shared, what updates."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.norm import (
    FIRST_BLOCK,
    KeyedBatchNorm,
    layer_keys,
    merge_statistics,
    own_statistics,
    statistics_key,
    trained_statistics,
)
from sdpoint_jax.core.points import SDPointContext
from sdpoint_jax.models import create
from tests.conftest import init_variables

RATIOS = (0.5, 0.75)


def _expected_keys(block: int) -> set[str]:
    """Oracle written from the rule: full, one key per (p < block, r), uniform."""
    keys = {"full", "uniform"}
    for point in range(1, block):
        for ratio in RATIOS:
            keys.add(f"p{point}_r{str(ratio).replace('.', 'p')}")
    return keys


def _stats_by_layer(variables) -> dict[str, dict]:
    flat = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
        names = [p.key for p in path]
        flat.setdefault("/".join(names[:-2]), set()).add(names[-2])
    return flat


def test_every_layer_owns_exactly_the_keys_its_block_needs(tiny_wrn):
    _, variables = tiny_wrn  # wrn-10-1: blocks 1..3, final_bn in block 4
    layers = _stats_by_layer(variables)
    assert set(layers) == {f"block{b}/bn{i}" for b in (1, 2, 3) for i in (1, 2)} | {"final_bn"}
    for layer, keys in layers.items():
        block = 4 if layer == "final_bn" else int(layer[5])
        assert keys == _expected_keys(block), layer


@pytest.mark.parametrize("instance", [Instance.full(), Instance(1, 0.5), Instance(2, 0.75)])
def test_training_updates_only_the_drawn_instance_and_uniform(tiny_wrn, instance):
    model, variables = tiny_wrn
    x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
    _, updated = model.apply(variables, x, instance=instance, train=True, mutable=["batch_stats"])
    before = variables["batch_stats"]
    for layer in _stats_by_layer(variables):
        block = 4 if layer == "final_bn" else int(layer[5])
        used = statistics_key(block, instance, "instance")
        assert used == ("full" if instance.is_full or block <= instance.point else instance.key)
        old = dict(before)
        new = dict(updated["batch_stats"])
        for part in layer.split("/"):
            old, new = old[part], new[part]
        for key in old:
            same = all(np.array_equal(old[key][s], new[key][s]) for s in ("mean", "var"))
            assert same == (key not in (used, "uniform")), (layer, key)


def test_eval_with_frozen_variables_works_for_every_instance(tiny_wrn):
    model, variables = tiny_wrn
    x = jnp.ones((1, 16, 16, 3))
    for instance in model.space:
        assert model.apply(variables, x, instance=instance, train=False).shape == (1, 10)


def test_uniform_mode_has_one_key_for_all_instances():
    model = create("wrn-10-1", bn_mode="uniform")
    variables = init_variables(model, (16, 16))
    assert set().union(*_stats_by_layer(variables).values()) == {"uniform"}
    assert layer_keys(4, RATIOS, "uniform") == ("uniform",)
    assert statistics_key(4, Instance(2, 0.5), "uniform") == "uniform"


@pytest.mark.parametrize(
    ("name", "bn_mode"),
    [("wrn-10-1", "instance"), ("wrn-10-1", "uniform"), ("densenet-bc-10-6", "instance")],
)
def test_trained_statistics_are_exactly_what_a_training_step_touches(name, bn_mode):
    """Oracle: applied to no statistics at all, a training step creates (from their
    initialisers) exactly the ones it reads and updates."""
    model = create(name, bn_mode=bn_mode)
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, instance=Instance.full(), train=False), x
    )
    for instance in model.space:
        touched = jax.eval_shape(
            lambda params, x, instance=instance: model.apply(
                {"params": params}, x, instance=instance, train=True, mutable=["batch_stats"]
            )[1]["batch_stats"],
            variables["params"],
            x,
        )
        selected = trained_statistics(variables["batch_stats"], instance, model.space, bn_mode)
        assert jax.tree.structure(selected) == jax.tree.structure(touched), instance
    assert trained_statistics(variables["batch_stats"], None, model.space, bn_mode) == {}


def _layer_blocks(model, x, monkeypatch) -> dict[str, int]:
    """Path of every batch-norm layer (``"block1/bn1"``) -> the block the architecture
    creates it in (its ``ctx.norm(block)`` call), recorded from one abstract pass."""
    created = {}
    norm = SDPointContext.norm

    def recording_norm(self, block, *, name=None):
        layer = norm(self, block, name=name)
        created[id(layer)] = (layer, block)
        return layer

    blocks = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, KeyedBatchNorm) and context.method_name == "__call__":
            layer, block = created[id(context.module)]
            assert layer is context.module
            blocks["/".join(context.module.path)] = block
        return next_fun(*args, **kwargs)

    with monkeypatch.context() as patch, nn.intercept_methods(interceptor):
        patch.setattr(SDPointContext, "norm", recording_norm)
        jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, instance=Instance.full(), train=False), x
        )
    return blocks


def _keys_by_layer(batch_stats) -> dict[str, set[str]]:
    layers: dict[str, set[str]] = {}
    for path in traverse_util.flatten_dict(batch_stats):
        layers.setdefault("/".join(path[:-2]), set()).add(path[-2])
    return layers


@pytest.mark.parametrize("name", ["wrn-10-1", "densenet-bc-10-6"])
def test_statistics_key_is_the_one_keying_rule(name, monkeypatch):
    """Every layer, every instance: a training step (applied to no statistics, so it
    creates exactly those it touches) touches the statistics key of the block the
    architecture put the layer in, and "uniform"; the layer owns what that rule gives
    over the whole space."""
    model = create(name)
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    blocks = _layer_blocks(model, x, monkeypatch)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, instance=Instance.full(), train=False), x
    )
    owned = _keys_by_layer(variables["batch_stats"])
    assert set(owned) == set(blocks)
    assert set(blocks.values()) == set(range(1, model.num_points + 2))
    for layer, block in blocks.items():
        rule = {statistics_key(block, instance) for instance in model.space} | {"uniform"}
        assert owned[layer] == rule == set(layer_keys(block, model.ratios, "instance")), layer
    for instance in model.space:
        touched = jax.eval_shape(
            lambda params, x, instance=instance: model.apply(
                {"params": params}, x, instance=instance, train=True, mutable=["batch_stats"]
            )[1]["batch_stats"],
            variables["params"],
            x,
        )
        expected = {
            layer: {statistics_key(block, instance), "uniform"} for layer, block in blocks.items()
        }
        assert _keys_by_layer(touched) == expected, instance


def test_first_block_uses_full_statistics_under_every_instance():
    space = InstanceSpace(4, RATIOS)
    assert {statistics_key(FIRST_BLOCK, instance) for instance in space} == {"full"}
    assert layer_keys(FIRST_BLOCK, RATIOS, "instance") == ("full", "uniform")


def test_own_statistics_are_the_instance_key_where_the_rule_gives_it(tiny_wrn):
    model, variables = tiny_wrn  # wrn-10-1: blocks 1..3, final_bn in block 4
    stats = variables["batch_stats"]
    full = traverse_util.flatten_dict(own_statistics(stats, Instance.full(), model.space))
    assert {path[:-1] for path in full} == {
        (*layer.split("/"), "full") for layer in _keys_by_layer(stats)
    }
    pooled = Instance(2, 0.75)
    own = traverse_util.flatten_dict(own_statistics(stats, pooled, model.space))
    assert {path[:-1] for path in own} == {
        ("block3", "bn1", "p2_r0p75"),
        ("block3", "bn2", "p2_r0p75"),
        ("final_bn", "p2_r0p75"),
    }
    for path, leaf in own.items():
        assert leaf is traverse_util.flatten_dict(stats)[path]


def test_statistics_of_another_model_are_rejected(tiny_wrn):
    model, variables = tiny_wrn
    with pytest.raises(ValueError, match=r"owning keys \['full', 'uniform'\] is in no block"):
        trained_statistics(variables["batch_stats"], Instance.full(), model.space, "uniform")
    with pytest.raises(ValueError, match=r"owning keys .*'p2_r0p75'.* is in no block"):
        trained_statistics(variables["batch_stats"], Instance.full(), InstanceSpace(1))
    with pytest.raises(ValueError, match="block must be an integer >= 1, got 0"):
        statistics_key(0, Instance.full())
    with pytest.raises(ValueError, match="block must be an integer >= 1, got 0"):
        layer_keys(0, RATIOS, "instance")


def test_merged_statistics_replace_the_trained_part_only(tiny_wrn):
    model, variables = tiny_wrn
    stats = variables["batch_stats"]
    before = jax.tree.map(np.array, stats)
    trained = trained_statistics(stats, Instance(1, 0.5), model.space)
    part = jax.tree.map(lambda leaf: leaf + 7.0, trained)
    merged = merge_statistics(stats, part)
    assert jax.tree.structure(merged) == jax.tree.structure(stats)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(stats)]
    changed = {
        path
        for path, old, new in zip(
            paths, jax.tree.leaves(stats), jax.tree.leaves(merged), strict=True
        )
        if not np.array_equal(old, new)
    }
    part_paths = {
        jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(part)
    }
    assert changed == part_paths
    assert "['block2']['bn1']['p1_r0p5']['mean']" in changed  # block 2 follows point 1
    assert "['block1']['bn1']['full']['mean']" in changed
    assert "['block1']['bn1']['uniform']['var']" in changed
    for old, now in zip(jax.tree.leaves(before), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(old, now)  # the input is left as it was


def test_bad_bn_mode_is_rejected():
    with pytest.raises(ValueError, match=r"bn_mode must be one of .*'layer'"):
        create("wrn-10-1", bn_mode="layer").apply(
            {}, jnp.ones((1, 8, 8, 3)), instance=Instance.full(), train=False
        )


def test_batch_norm_numerics_match_pytorch_semantics():
    layer = KeyedBatchNorm(keys=("full", "uniform"), key="full", use_running_average=False)
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)) * 3.0 + 1.0
    variables = layer.init(jax.random.key(1), x)
    y, updated = layer.apply(variables, x, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 5)
    mean, var = flat.mean(0), flat.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    stats = updated["batch_stats"]["full"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    unbiased = flat.var(0, ddof=1)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
    frozen = KeyedBatchNorm(keys=("full", "uniform"), key="full", use_running_average=True)
    y_eval = frozen.apply({"params": variables["params"], **updated}, x)
    expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-5)


def test_axis_name_averages_statistics_across_the_mapped_axis():
    layer = KeyedBatchNorm(keys=("full",), key="full", use_running_average=False, axis_name="d")
    x = (
        jax.random.normal(jax.random.key(0), (2, 4, 3, 3, 5))
        + jnp.arange(2.0)[:, None, None, None, None]
    )
    variables = layer.init(jax.random.key(1), x[0])
    apply = lambda xs: layer.apply(variables, xs, mutable=["batch_stats"])  # noqa: E731
    y, updated = jax.vmap(apply, axis_name="d")(x)
    flat = np.asarray(x).reshape(-1, 5)
    np.testing.assert_allclose(
        y.reshape(-1, 5), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        updated["batch_stats"]["full"]["var"][0], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5
    )
