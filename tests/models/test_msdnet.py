"""MSDNet: layout, per-exit cost against IMTA's Table 1, Gradient Equilibrium placement."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax import flops
from sdpoint_jax.compare.early_exit import joint_loss
from sdpoint_jax.models import create, training_defaults
from sdpoint_jax.models.cost import exit_costs
from sdpoint_jax.models.msdnet import MSDNet, msdnet, parse_options
from tests.conftest import HW, random_variables

# IMTA (Li et al., ICCV 2019) Table 1, MSDNet on CIFAR-100, exits 1..7
TABLE1_PARAMS_M = (0.30, 0.65, 1.11, 1.73, 2.38, 3.05, 4.0)
TABLE1_MADDS_M = (6.86, 14.35, 27.29, 48.45, 76.43, 108.9, 137.3)


def tiny(**fields) -> MSDNet:
    """A 3-exit MSDNet with 2 scales on 16x16 images (a few thousand parameters)."""
    defaults = dict(
        step=1,
        base=1,
        stepmode="even",
        channels=4,
        growth=2,
        gr_factor=(1, 2),
        bn_factor=(1, 2),
    )
    return msdnet(3, 10, **{**defaults, **fields})


@functools.cache
def _variables(model: MSDNet) -> dict:
    return random_variables(model, 0)


def _images(batch: int = 4) -> jax.Array:
    return jnp.asarray(np.random.default_rng(1).standard_normal((batch, *HW, 3)), jnp.float32)


def test_table1_params_and_madds_per_exit(capsys):
    """``flops --model msdnet-7 --dataset cifar100 --json``: within 3% of IMTA's Table 1
    at every exit, shapes only."""
    flops.main(["--model", "msdnet-7", "--dataset", "cifar100", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [row["exit"] for row in rows] == list(range(1, 8))
    for row, params, madds in zip(rows, TABLE1_PARAMS_M, TABLE1_MADDS_M, strict=True):
        assert row["params"] / 1e6 == pytest.approx(params, rel=0.03), row
        assert row["madds"] / 1e6 == pytest.approx(madds, rel=0.03), row
        assert row["flops"] > 2 * row["madds"]  # + BN, ReLU, pooling, concatenated adds
    params = [row["params"] for row in rows]
    assert params == sorted(params) and len(set(params)) == 7


def test_registry_names_and_options():
    model = create("msdnet-7", num_classes=100)
    assert (model.stepmode, model.step, model.base, model.channels, model.growth) == (
        "lin_grow",
        1,
        1,
        16,
        6,
    )
    assert model.block_steps == (1, 2, 3, 4, 5, 6, 7)
    anytime = create("msdnet-7-even-step2-base4", num_classes=100)
    assert anytime.block_steps == (4, 2, 2, 2, 2, 2, 2)
    imagenet = create("msdnet-imagenet-5")
    assert imagenet.imagenet and imagenet.gr_factor == (1, 2, 4, 4)
    assert imagenet.block_steps == (4, 4, 4, 4, 4)
    assert parse_options("-ch8-gr4") == {"channels": 8, "growth": 4}
    assert training_defaults("msdnet-7").batch_size == 64
    with pytest.raises(ValueError, match="unknown MSDNet option 'x3'"):
        create("msdnet-7-x3")
    with pytest.raises(ValueError, match="stepmode must be one of"):
        msdnet(3, 10, stepmode="odd")
    with pytest.raises(ValueError, match="growthRate \\* grFactor must be even"):
        msdnet(3, 10, growth=3, gr_factor=(1, 3), bn_factor=(1, 2))


def test_plan_prunes_scales_and_inserts_transitions():
    """``prune max``: 16 layers in 3 runs of 6; the first layer of each later run drops
    the finest scale and a transition halves the base channels after it."""
    plan = [spec for block in create("msdnet-7").plan for spec in block]
    assert len(plan) == 28
    interval = math.ceil(28 / 3)
    dropped = [n for n, spec in enumerate(plan, start=1) if spec.in_scales > spec.out_scales]
    assert dropped == [interval + 1, 2 * interval + 1]
    assert [spec.transition for spec in plan if spec.transition] == [41, 50]  # 82 // 2, 101 // 2


def test_up_to_and_cascade_match_the_full_call():
    model = tiny(isc=True)
    variables = _variables(model)
    apply = jax.jit(model.apply, static_argnames=("train", "up_to", "cascade"))
    every = apply(variables, _images(), train=False)
    assert len(every) == 3 and every[0].shape == (4, 10)
    np.testing.assert_allclose(
        apply(variables, _images(), train=False, up_to=2), every[1], rtol=1e-5, atol=1e-6
    )
    cascade = apply(variables, _images(), train=False, up_to=2, cascade=True)
    assert len(cascade) == 2
    np.testing.assert_allclose(cascade[0], every[0], rtol=1e-5, atol=1e-6)


def test_exit_costs_are_cumulative():
    """The cost of exit ``i`` from the one trace equals a trace of exits ``1..i``."""
    from sdpoint_jax.models.cost import count_exit_flops

    model = tiny()
    costs = exit_costs(model, HW)
    for cost in costs:
        assert cost.flops == count_exit_flops(model, cost.exit, HW, cascade=True)
        assert cost.madds == count_exit_flops(
            model, cost.exit, HW, cascade=True, convention="madds"
        )
    total = sum(leaf.size for leaf in jax.tree.leaves(_variables(model)["params"]))
    assert costs[-1].params == total


# Parameter groups of the tiny MSDNet whose every path to exit j's loss crosses the same
# Gradient Equilibrium factors: {exit j: {top-level module: factor}}, k = 3 exits, two
# scales (layer 3 drops the finer one). Only the coarsest scale is split after each
# block (the authors' placement): e.g. the finer unit of layer 2 reaches exit 3 through
# the unscaled finer scale (factor 1) while the coarser unit of layer 2 crosses block 2's
# trunk factor 1/2; and every block-1 path to exit 1 crosses its branch factor 1/3.
GE_FACTORS = {
    0: {
        "first_scale0": 1 / 3,
        "first_scale1": 1 / 3,
        "layer1_scale1": 1 / 3,
        "exit1": 1.0,
    },
    1: {"layer1_scale0": 1 / 2, "layer2_scale1": 1 / 2, "exit2": 1.0},
    2: {"layer1_scale1": 1 / 3, "layer2_scale0": 1.0, "layer2_scale1": 1 / 2, "exit3": 1.0},
}


def test_ge_gradients_equal_the_analytic_rescaling():
    """With GE, the gradient of exit ``j``'s loss w.r.t. each parameter group is the
    plain gradient times the product of the GE factors on its paths (IMTA Eq. 4-5:
    ``1 / (k - i + 1)`` at classifier ``i``'s input, ``(k - i) / (k - i + 1)`` on the
    trunk), :data:`GE_FACTORS`."""
    images, labels = _images(), jnp.arange(4) % 10
    plain_model = tiny()
    variables = _variables(plain_model)

    def per_exit_grads(params):
        def losses(model, params):
            logits = model.apply({**variables, "params": params}, images, train=False)
            return jnp.stack([joint_loss([z], labels) for z in logits])

        return (
            jax.jacrev(functools.partial(losses, plain_model))(params),
            jax.jacrev(functools.partial(losses, tiny(ge=True)))(params),
        )

    plain, ge = jax.jit(per_exit_grads)(variables["params"])
    for j, factors in GE_FACTORS.items():
        for name, factor in factors.items():
            expected = jax.tree.leaves(jax.tree.map(lambda g, j=j, f=factor: f * g[j], plain[name]))
            actual = jax.tree.leaves(jax.tree.map(lambda g, j=j: g[j], ge[name]))
            for a, b in zip(actual, expected, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
            reference = jax.tree.leaves(jax.tree.map(lambda g, j=j: g[j], plain[name]))
            assert max(np.abs(g).max() for g in reference) > 0, (j, name)
