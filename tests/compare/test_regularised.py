"""Dropout and stochastic depth in the WRN, and the regularised comparison method."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.compare.regularised import DETERMINISTIC, RegularisedMethod
from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import Add, Relu
from sdpoint_jax.core.points import SDPointContext
from sdpoint_jax.models import create
from sdpoint_jax.models.base import SDPointModel
from sdpoint_jax.models.cost import count_flops

FULL = Instance.full()
HW = (8, 8)
BATCH = 4


class _ReferenceBlock(nn.Module):
    """The WRN block as it was before the regularisers were added."""

    features: int
    stride: int
    index: int
    ctx: SDPointContext

    @nn.compact
    def __call__(self, x):
        preact = Relu()(self.ctx.norm(self.index, name="bn1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = self.ctx.conv(self.features, 1, self.stride, name="shortcut")(preact)
        y = self.ctx.conv(self.features, 3, self.stride, name="conv1")(preact)
        y = Relu()(self.ctx.norm(self.index, name="bn2")(y))
        y = self.ctx.conv(self.features, 3, name="conv2")(y)
        return Add()(y, shortcut)


class _ReferenceWRN(SDPointModel, kw_only=True):
    """The WRN as it was before the regularisers were added (WRN-10-1 layout)."""

    @property
    def num_points(self) -> int:
        return 3

    @nn.compact
    def __call__(self, x, *, instance, train):
        ctx = self.context(instance, train)
        x = ctx.conv(16, 3, name="stem")(x)
        for index, (base, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            x = _ReferenceBlock(base, stride, index, ctx, name=f"block{index}")(x)
            x = ctx.point(x, index)
        x = Relu()(ctx.norm(4, name="final_bn")(x))
        return self.head(x)


def _images(seed: int = 1, batch: int = BATCH, hw: tuple[int, int] = HW) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, *hw, 3))


def _init(model):
    return model.init(jax.random.key(0), jnp.zeros((1, *HW, 3)), instance=FULL, train=False)


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _calls(model, variables, x, *, train, **kwargs):
    """``(module, input, output)`` of every module call of one forward pass, in order."""
    calls = []

    def record(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if context.method_name == "__call__":
            calls.append((context.module, args, out))
        return out

    mutable = ["batch_stats"] if train else False
    with nn.intercept_methods(record):
        model.apply(variables, x, instance=FULL, train=train, mutable=mutable, **kwargs)
    return calls


@pytest.fixture(scope="module")
def reference():
    model = _ReferenceWRN(num_classes=10)
    return model, _init(model)


def test_rates_at_zero_are_the_original_network(reference):
    ref_model, ref_vars = reference
    x = _images()
    for model in (create("wrn-10-1"), create("wrn-10-1", dropout_rate=0.0, stochastic_depth=0.0)):
        variables = _init(model)
        _assert_trees_equal(variables, ref_vars)
        # no "dropout" rng is given: none may be needed
        out, stats = model.apply(variables, x, instance=FULL, train=True, mutable=["batch_stats"])
        ref_out, ref_stats = ref_model.apply(
            ref_vars, x, instance=FULL, train=True, mutable=["batch_stats"]
        )
        np.testing.assert_array_equal(out, ref_out)
        _assert_trees_equal(stats, ref_stats)
        np.testing.assert_array_equal(
            model.apply(variables, x, instance=FULL, train=False),
            ref_model.apply(ref_vars, x, instance=FULL, train=False),
        )


def test_regularisers_add_no_parameters_and_dropout_is_identity_at_inference(reference):
    _, ref_vars = reference
    x = _images()
    model = create("wrn-10-1", dropout_rate=0.3, stochastic_depth=0.5)
    _assert_trees_equal(_init(model), ref_vars)
    dropout = create("wrn-10-1", dropout_rate=0.3)
    plain = create("wrn-10-1")
    np.testing.assert_array_equal(
        dropout.apply(ref_vars, x, instance=FULL, train=False),
        plain.apply(ref_vars, x, instance=FULL, train=False),
    )


def test_dropout_sits_between_second_bn_relu_and_conv2():
    rate = 0.5
    model = create("wrn-10-1", dropout_rate=rate)
    variables = _init(model)
    calls = _calls(model, variables, _images(), train=True, rngs={"dropout": jax.random.key(5)})
    drops = [i for i, (module, _, _) in enumerate(calls) if isinstance(module, nn.Dropout)]
    assert len(drops) == model.num_points  # one per block
    kept = total = 0
    for i in drops:
        (before, _, relu_out), (_, (drop_in,), drop_out), (after, (conv_in,), _) = calls[
            i - 1 : i + 2
        ]
        assert isinstance(before, Relu) and isinstance(after, nn.Conv) and after.name == "conv2"
        assert before.parent.name == after.parent.name  # the same block
        np.testing.assert_array_equal(drop_in, relu_out)
        np.testing.assert_array_equal(conv_in, drop_out)
        # inverted dropout: each activation is zeroed or scaled by 1 / (1 - rate)
        kept_mask = drop_out != 0
        np.testing.assert_allclose(drop_out[kept_mask], drop_in[kept_mask] / (1 - rate), rtol=1e-6)
        kept += int(jnp.sum(kept_mask & (drop_in != 0)))
        total += int(jnp.sum(drop_in != 0))
    assert abs(kept / total - (1 - rate)) < 0.05


def test_dropout_is_random_in_training_only():
    model = create("wrn-10-1", dropout_rate=0.3)
    variables = _init(model)
    x = _images()

    def train_logits(seed):
        logits, _ = model.apply(
            variables,
            x,
            instance=FULL,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(seed)},
        )
        return logits

    np.testing.assert_array_equal(train_logits(0), train_logits(0))
    assert not np.allclose(train_logits(0), train_logits(1))
    eval_logits = [
        model.apply(variables, x, instance=FULL, train=False, rngs={"dropout": jax.random.key(s)})
        for s in (0, 1)
    ]
    np.testing.assert_array_equal(eval_logits[0], eval_logits[1])
    np.testing.assert_array_equal(
        eval_logits[0], model.apply(variables, x, instance=FULL, train=False)
    )


def test_stochastic_depth_drops_blocks_with_linearly_decaying_rate():
    drop_last = 0.6
    model = create("wrn-16-1", stochastic_depth=drop_last)
    blocks = model.num_points
    expected_survival = [1 - l / blocks * drop_last for l in range(1, blocks + 1)]
    np.testing.assert_allclose(model.survival_probabilities, expected_survival)
    assert math.isclose(model.survival_probabilities[-1], 1 - drop_last)

    batch = 512
    variables = _init(model)
    calls = _calls(
        model, variables, _images(2, batch, (4, 4)), train=True, rngs={"dropout": jax.random.key(7)}
    )
    conv2_out = [
        out for module, _, out in calls if isinstance(module, nn.Conv) and module.name == "conv2"
    ]
    branches = [args[0] for module, args, _ in calls if isinstance(module, Add)]
    assert len(branches) == len(conv2_out) == blocks
    for l, (branch, full) in enumerate(zip(branches, conv2_out, strict=True), start=1):
        dropped = np.asarray(jnp.all(branch == 0, axis=(1, 2, 3)))
        # a dropped block passes its shortcut only; a kept one adds the unscaled branch
        np.testing.assert_array_equal(branch[~dropped], full[~dropped])
        assert abs(dropped.mean() - l / blocks * drop_last) < 0.08, (l, dropped.mean())


def test_deterministic_inference_scales_branches_by_survival():
    model = create("wrn-16-1", stochastic_depth=0.5)
    variables = _init(model)
    calls = _calls(model, variables, _images(), train=False)
    conv2_out = [
        out for module, _, out in calls if isinstance(module, nn.Conv) and module.name == "conv2"
    ]
    branches = [args[0] for module, args, _ in calls if isinstance(module, Add)]
    for survival, branch, full in zip(
        model.survival_probabilities, branches, conv2_out, strict=True
    ):
        np.testing.assert_allclose(branch, survival * full, rtol=1e-6)
    x = _images()
    np.testing.assert_array_equal(
        model.apply(variables, x, instance=FULL, train=False, rngs={"dropout": jax.random.key(1)}),
        model.apply(variables, x, instance=FULL, train=False),
    )


@pytest.mark.parametrize("options", [{"dropout_rate": 0.3}, {"stochastic_depth": 0.5}])
def test_stochastic_inference_is_random_with_running_statistics(options):
    model = create("wrn-10-1", **options)
    variables = _init(model)
    x = _images()

    def run(variables, seed):  # mutable=False: running statistics, never updated
        return model.apply(
            variables,
            x,
            instance=FULL,
            train=False,
            stochastic_inference=True,
            rngs={"dropout": jax.random.key(seed)},
        )

    np.testing.assert_array_equal(run(variables, 0), run(variables, 0))
    assert not np.allclose(run(variables, 0), run(variables, 1))
    shifted = {
        **variables,
        "batch_stats": jax.tree.map(lambda s: s + 1.0, variables["batch_stats"]),
    }
    assert not np.allclose(run(shifted, 0), run(variables, 0))
    with pytest.raises(ValueError, match="stochastic_inference"):
        model.apply(variables, x, instance=FULL, train=True, stochastic_inference=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dropout_rate", 1.0),
        ("dropout_rate", -0.1),
        ("stochastic_depth", 1.0),
        ("stochastic_depth", float("nan")),
    ],
)
def test_bad_rates_raise(field, value):
    with pytest.raises(ValueError, match=rf"{field} must lie in \[0, 1\), got {value}"):
        create("wrn-16-1", **{field: value})
    with pytest.raises(ValueError, match=field):
        RegularisedMethod("wrn-10-1", **{field: value})


@pytest.fixture(scope="module")
def method():
    method = RegularisedMethod("wrn-10-1", num_classes=10, dropout_rate=0.3, stochastic_depth=0.5)
    return method, method.init_variables(jax.random.key(0), HW[0])


def test_method_loss_uses_its_key_and_updates_statistics(method):
    method, variables = method
    batch = {"image": _images(), "label": jnp.arange(BATCH, dtype=jnp.int32)}
    setting = method.train_setting(0, 0)

    def run(seed):
        return method.loss(variables["params"], variables, batch, setting, jax.random.key(seed))

    (l0, (updated, logits)), (l0_again, _), (l1, _) = run(0), run(0), run(1)
    assert logits.shape == (BATCH, 10)
    assert float(l0) == float(l0_again) and float(l0) != float(l1)
    assert jax.tree.structure(updated["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )
    assert not np.allclose(
        jax.tree.leaves(updated["batch_stats"])[0], jax.tree.leaves(variables["batch_stats"])[0]
    )


def test_method_settings_and_costs(method):
    method, variables = method
    assert method.name == "dropout+stochastic_depth"
    assert RegularisedMethod("wrn-10-1", dropout_rate=0.3).name == "dropout"
    assert tuple(method.eval_settings()) == (DETERMINISTIC,)
    x = _images()
    np.testing.assert_array_equal(
        method.logits(variables, x, DETERMINISTIC),
        method.model.apply(variables, x, instance=FULL, train=False),
    )
    assert method.gflops(DETERMINISTIC, 32) == count_flops(create("wrn-10-1"), FULL, (32, 32)) / 1e9
    with pytest.raises(ValueError, match="only setting"):
        method.logits(variables, x, "full")
    with pytest.raises(ValueError, match="plain network"):
        RegularisedMethod("wrn-10-1")
    with pytest.raises(ValueError, match="Wide ResNet"):
        RegularisedMethod("vgg-11", dropout_rate=0.3)


def test_stochastic_logits_average_softmax_over_passes(method):
    method, variables = method
    x, key, passes = _images(), jax.random.key(3), 4
    probs = method.stochastic_probabilities(variables, x, key, passes=passes)
    assert probs.shape == (BATCH, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(
        probs, method.stochastic_probabilities(variables, x, key, passes=passes)
    )
    single = [
        jax.nn.softmax(
            method.model.apply(
                variables,
                x,
                instance=FULL,
                train=False,
                stochastic_inference=True,
                rngs={"dropout": k},
            )
        )
        for k in jax.random.split(key, passes)
    ]
    np.testing.assert_allclose(probs, np.mean(single, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(probs, single[0])
    assert not np.allclose(
        probs, method.stochastic_probabilities(variables, x, jax.random.key(4), passes)
    )
    with pytest.raises(ValueError, match="passes"):
        method.stochastic_probabilities(variables, x, key, passes=0)
