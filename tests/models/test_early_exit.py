"""Early-exit WRN, the IMTA techniques (GE, ISC, OFA) and budgeted inference."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from sdpoint_jax.compare.early_exit import EarlyExitMethod, joint_loss, ofa_kl
from sdpoint_jax.core.instance import Instance, InstanceSpace
from sdpoint_jax.core.norm import FIRST_BLOCK, statistics_key, trained_statistics
from sdpoint_jax.evaluation.budget import budgeted_eval, fit_thresholds
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import count_exit_flops, count_flops
from sdpoint_jax.models.early_exit import EarlyExitWRN, early_exit_wrn, ge_split

HW = (16, 16)


@functools.cache
def _variables(model: EarlyExitWRN) -> dict:
    """Variables of ``model``'s structure filled from numpy (He-normal kernels, small
    random biases, BN statistics 0/1): compiling ``init``'s random number generation
    costs far more than the tests themselves on a CPU."""
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, *HW, 3)))
    rng = np.random.default_rng(0)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        if name in ("var", "scale"):
            return jnp.ones(leaf.shape)
        if name == "mean":
            return jnp.zeros(leaf.shape)
        if name == "bias":
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(batch: int = 4, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *HW, 3)), jnp.float32)


def _labels(batch: int = 4) -> jax.Array:
    return jnp.arange(batch) % 10


# --- Gradient Equilibrium -------------------------------------------------------------


def test_ge_split_is_identity_forward_and_rescales_backward():
    x = jnp.array([0.5, -1.5, 2.0])
    a = jnp.array([1.0, 2.0, -3.0])
    k = 5
    for i in range(1, k + 1):
        branch, trunk = ge_split(x, i, k)
        np.testing.assert_array_equal(branch, x)
        np.testing.assert_array_equal(trunk, x)

        def loss(x, i=i):
            branch, trunk = ge_split(x, i, k)
            return jnp.sum(a * branch) + jnp.sum(trunk**2)

        # d/dx: a from the branch, 2x from the trunk, scaled 1/(k-i+1) and (k-i)/(k-i+1)
        expected = a / (k - i + 1) + 2 * x * (k - i) / (k - i + 1)
        np.testing.assert_allclose(jax.grad(loss)(x), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        ge_split(x, 0, k)


def _toy_chain_losses(x: jax.Array, weights: jax.Array, ge: bool) -> list[jax.Array]:
    """k exits on a scalar chain: trunk h_i = tanh(w_i h_{i-1}); exit i's loss
    (h_i - i)^2 through branch i, GE-split at exits 1..k-1."""
    k = weights.shape[0]
    h, losses = x, []
    for i in range(1, k + 1):
        h = jnp.tanh(weights[i - 1] * h)
        branch = h
        if ge and i < k:
            branch, h = ge_split(h, i, k)
        losses.append((branch - i) ** 2)
    return losses


def test_ge_gives_paper_eq5_per_loss_scaling():
    """IMTA Eq. 5: with GE, d L_j / d w_i is 1/(k - i + 1) times the plain gradient for
    every j >= i, whatever the graph between them."""
    k = 4
    weights = jnp.array([0.7, -1.2, 0.9, 1.1])
    x = jnp.float32(0.8)
    for j in range(1, k + 1):
        loss_j = lambda w, ge, j=j: _toy_chain_losses(x, w, ge)[j - 1]  # noqa: E731
        plain = jax.grad(loss_j)(weights, False)
        with_ge = jax.grad(loss_j)(weights, True)
        for i in range(1, k + 1):
            scale = 1.0 / (k - i + 1) if i <= j else 0.0
            np.testing.assert_allclose(with_ge[i - 1], scale * plain[i - 1], rtol=1e-5)
        assert plain[j - 1] != 0


def test_ge_in_the_network_scales_trunk_gradients():
    """WRN-10-1 has exits after blocks 1, 2, 3 (k = 3): the stem is below every split
    (factor 1/3), block 2 below splits 2.. (factor 1/2), each exit's own branch is not
    rescaled."""
    plain = early_exit_wrn(10, 1, 10)
    with_ge = early_exit_wrn(10, 1, 10, ge=True)
    variables = _variables(plain)
    images, labels = _images(), _labels()

    def exit_loss(params, model, j):
        logits = model.apply({**variables, "params": params}, images, train=False)[j - 1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    all_grads = {
        (ge, j): jax.grad(exit_loss)(variables["params"], model, j)
        for ge, model in ((False, plain), (True, with_ge))
        for j in (2, 3)
    }
    # (exit j, {parameters: GE factor}); a loss's own head is below no split
    expected = (
        (2, {"stem": 1 / 3, "block2": 1 / 2, "branch2": 1.0}),
        (3, {"stem": 1 / 3, "block2": 1 / 2, "block3": 1.0, "classifier": 1.0}),
    )
    for j, scales in expected:
        g_plain, g_ge = all_grads[False, j], all_grads[True, j]
        for name, scale in scales.items():
            leaves = zip(jax.tree.leaves(g_ge[name]), jax.tree.leaves(g_plain[name]), strict=True)
            for a, b in leaves:
                assert np.any(b != 0)
                np.testing.assert_allclose(a, scale * b, rtol=1e-4, atol=1e-7)


# --- Inline Subnetwork Collaboration --------------------------------------------------


def test_isc_adds_previous_logits_and_stops_their_gradient():
    plain = early_exit_wrn(10, 1, 10)
    isc = early_exit_wrn(10, 1, 10, isc=True)
    variables = _variables(plain)
    images, labels = _images(), _labels()
    own = plain.apply(variables, images, train=False)
    chained = isc.apply(variables, images, train=False)
    # exit i = own_i + exit i-1 (cumulative): exit 3 = own_3 + own_2 + own_1
    np.testing.assert_allclose(chained[0], own[0], rtol=1e-6)
    np.testing.assert_allclose(chained[1], own[1] + own[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chained[2], own[2] + own[1] + own[0], rtol=1e-5, atol=1e-5)

    # exit 2's value moves with branch 1's classifier bias ...
    params = variables["params"]
    shifted = jax.tree.map(lambda x: x, params)
    shifted["branch1"]["classifier"]["bias"] = params["branch1"]["classifier"]["bias"] + 1.0
    moved = isc.apply({**variables, "params": shifted}, images, train=False)
    np.testing.assert_allclose(moved[1], chained[1] + 1.0, rtol=1e-5, atol=1e-5)

    # ... but exit 2's loss sends no gradient into branch 1 (only used by exit 1)
    def exit2_loss(params):
        logits = isc.apply({**variables, "params": params}, images, train=False)[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(exit2_loss)(params)
    for leaf in jax.tree.leaves(grads["branch1"]):
        np.testing.assert_array_equal(leaf, 0.0)
    assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(grads["branch2"]))


# --- One-for-all distillation ---------------------------------------------------------


def test_ofa_kl_zero_iff_exits_agree_and_teacher_gets_no_gradient():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    np.testing.assert_allclose(ofa_kl(logits, logits, 3.0), 0.0, atol=1e-6)
    np.testing.assert_allclose(ofa_kl(logits + 5.0, logits, 3.0), 0.0, atol=1e-6)
    other = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    assert np.all(ofa_kl(other, logits, 3.0) > 1e-4)
    # KL(p_t || p_s) by hand
    t, s = jax.nn.softmax(logits / 2.0), jax.nn.softmax(other / 2.0)
    np.testing.assert_allclose(
        ofa_kl(other, logits, 2.0), jnp.sum(t * jnp.log(t / s), -1), rtol=1e-5
    )

    labels = jnp.array([0, 3, 6])
    student, teacher = other, logits
    alpha, temp = 0.25, 2.0

    def loss(student, teacher):
        return joint_loss([student, teacher], labels, ofa=True, temperature=temp, alpha=alpha)

    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()  # noqa: E731
    expected = ce(teacher) + (1 - alpha) * ce(student)
    expected += alpha * temp**2 * ofa_kl(student, teacher, temp).mean()
    np.testing.assert_allclose(loss(student, teacher), expected, rtol=1e-6)
    # the teacher is trained by its own cross-entropy only
    np.testing.assert_allclose(
        jax.grad(loss, argnums=1)(student, teacher), jax.grad(ce)(teacher), rtol=1e-5
    )
    np.testing.assert_allclose(
        joint_loss([student, teacher], labels), ce(student) + ce(teacher), rtol=1e-6
    )


# --- structure, exits and FLOPs -------------------------------------------------------


def test_exit_layout():
    assert early_exit_wrn(10, 1).exit_blocks == (1, 2, 3)
    assert early_exit_wrn(16, 1).exit_blocks == (1, 2, 3, 4, 5, 6)
    assert early_exit_wrn(28, 10).exit_blocks == (2, 4, 6, 8, 10, 12)
    assert early_exit_wrn(40, 4).exit_blocks == (3, 6, 9, 12, 15, 18)
    assert early_exit_wrn(40, 4).num_exits == 6
    with pytest.raises(ValueError, match="6n"):
        early_exit_wrn(12, 1)


@pytest.mark.parametrize("isc", [False, True])
def test_up_to_matches_full_call(isc: bool):
    model = early_exit_wrn(16, 1, 10, isc=isc, ge=True)
    variables = _variables(model)
    images = _images()
    apply = model.apply  # eager: cheaper than compiling 8 programs
    full = apply(variables, images, train=False)
    assert len(full) == model.num_exits == 6
    for i in range(1, model.num_exits + 1):
        single = apply(variables, images, train=False, up_to=i)
        assert single.shape == (4, 10) and single.dtype == jnp.float32
        np.testing.assert_allclose(single, full[i - 1], rtol=1e-5, atol=1e-6)
    prefix = apply(variables, images, train=False, up_to=3, cascade=True)
    assert len(prefix) == 3
    np.testing.assert_allclose(prefix[-1], full[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        model.apply(variables, images, train=False, up_to=7)


def test_last_exit_is_the_wrn():
    """The trunk and the last exit are WideResNet's own layers, with its parameter names
    and its full-instance batch-norm statistics."""
    model = early_exit_wrn(10, 1, 10)
    variables = _variables(model)
    images = _images()
    trunk = {
        collection: {k: v for k, v in tree.items() if not k.startswith("branch")}
        for collection, tree in variables.items()
    }
    wrn = create("wrn-10-1", num_classes=10)
    expected = wrn.apply(trunk, images, instance=Instance.full(), train=False)
    got = model.apply(variables, images, train=False, up_to=model.num_exits)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_every_batch_norm_layer_is_keyed_as_the_first_block():
    """Trunk and branches: every layer owns what the keying rule gives the first block
    (the full instance's key and "uniform"), and a training step touches all of it."""
    model = early_exit_wrn(10, 1, 10)
    images = jax.ShapeDtypeStruct((2, *HW, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    stats = shapes["batch_stats"]
    layers: dict[tuple[str, ...], set[str]] = {}
    for path in traverse_util.flatten_dict(stats):
        layers.setdefault(path[:-2], set()).add(path[-2])
    # three trunk blocks of two layers, the final BN, two branches of three layers
    assert len(layers) == 3 * 2 + 1 + 2 * 3
    keys = {statistics_key(FIRST_BLOCK, Instance.full()), "uniform"}
    assert keys == {"full", "uniform"}
    assert all(owned == keys for owned in layers.values())
    touched = jax.eval_shape(
        lambda params, x: model.apply({"params": params}, x, train=True, mutable=["batch_stats"])[
            1
        ]["batch_stats"],
        shapes["params"],
        images,
    )
    selected = trained_statistics(stats, Instance.full(), InstanceSpace(0))
    assert jax.tree.structure(touched) == jax.tree.structure(selected) == jax.tree.structure(stats)


def _branch_flops(channels: int, size: int, classes: int) -> int:
    """A branch on a size x size x channels map: block (BN, ReLU, conv, BN, ReLU, conv,
    add = 36C + 7 per element), BN-ReLU (3), global pool (1), linear."""
    return size * size * channels * (36 * channels + 11) + 2 * channels * classes + classes


def test_exit_flops():
    # WRN-28-1: exits after blocks 2, 4 of each stage; static cost strictly increasing
    deep = early_exit_wrn(28, 1, 10)
    static = [count_exit_flops(deep, i, HW) for i in range(1, 7)]
    assert all(a < b for a, b in itertools.pairwise(static))
    assert static[-1] == count_flops(create("wrn-28-1"), Instance.full(), HW)

    # WRN-16-1 (16x16 input): branches on 16x16x16, 16x16x16, 8x8x32, 8x8x32, 4x4x64
    model = early_exit_wrn(16, 1, 10)
    plain = count_flops(create("wrn-16-1"), Instance.full(), HW)
    cascade = [count_exit_flops(model, i, HW, cascade=True) for i in range(1, 7)]
    assert all(a < b for a, b in itertools.pairwise(cascade))
    branches = sum(
        _branch_flops(c, s, 10) for c, s in ((16, 16), (16, 16), (32, 8), (32, 8), (64, 4))
    )
    assert cascade[-1] == plain + branches
    static = [count_exit_flops(model, i, HW) for i in range(1, 7)]
    assert static[0] == cascade[0]
    assert static[-1] == plain
    # a branch costs what the block and head it stands for cost: exit 5 ties the WRN
    assert static[4] == plain

    # with ISC exit i needs exits 1..i: static = cascade, plus one addition per exit
    isc = early_exit_wrn(16, 1, 10, isc=True)
    assert count_exit_flops(isc, 6, HW) == plain + branches + 5 * 10


# --- budgeted inference ---------------------------------------------------------------


def _synthetic_probs(k: int, n: int, classes: int, seed: int = 0):
    """Later exits are sharper and more often right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    probs = []
    for i in range(k):
        logits = rng.normal(size=(n, classes))
        logits[np.arange(n), labels] += 0.5 + 0.8 * i
        probs.append(jax.nn.softmax(logits * (1.0 + 0.3 * i), axis=-1))
    return np.stack(probs), labels


def test_fit_thresholds_meets_the_budget():
    probs, labels = _synthetic_probs(k=4, n=3000, classes=10)
    costs = np.array([1.0, 1.8, 3.1, 4.0])
    errors = []
    for target in (1.2, 1.9, 2.5, 3.3, 3.9):
        thresholds = fit_thresholds(probs, costs, target)
        assert thresholds[-1] == -np.inf
        avg, error = budgeted_eval(probs, labels, thresholds, costs)
        assert abs(avg - target) <= 0.02 * target
        errors.append(error)
    # more budget, fewer errors (later exits are better here)
    assert errors[0] > errors[-1]
    with pytest.raises(ValueError, match="outside"):
        fit_thresholds(probs, costs, 4.5)


def test_budgeted_eval_by_hand():
    # 2 exits, 3 samples, 2 classes
    probs = np.array(
        [
            [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]],  # exit 1 predicts 0, 0, 1
            [[0.2, 0.8], [0.1, 0.9], [0.05, 0.95]],  # exit 2 predicts 1, 1, 1
        ]
    )
    labels = np.array([0, 1, 0])
    costs = np.array([1.0, 3.0])
    # threshold 0.7: samples 0 and 2 leave at exit 1 (right, wrong), sample 1 at exit 2
    avg, error = budgeted_eval(probs, labels, np.array([0.7, 2.0]), costs)
    assert avg == pytest.approx(5.0 / 3.0)
    assert error == pytest.approx(100.0 / 3.0)
    # nothing leaves early: the last exit's error and cost
    assert budgeted_eval(probs, labels, [np.inf, np.inf], costs) == pytest.approx(
        (3.0, 200.0 / 3.0)
    )
    # everything leaves at exit 1
    assert budgeted_eval(probs, labels, [0.0, 0.0], costs) == pytest.approx((1.0, 200.0 / 3.0))
    # 1.6 GFLOPs on average: q = (0.7, 0.3), so round(0.7 * 3) = 2 samples leave at exit 1
    thresholds = fit_thresholds(probs, costs, 1.6)
    assert thresholds[0] == pytest.approx(0.7)
    assert budgeted_eval(probs, labels, thresholds, costs)[0] == pytest.approx(5.0 / 3.0)


# --- the method ------------------------------------------------------------------------


def test_method_interface():
    method = EarlyExitMethod(10, 1, 10, ge=True, isc=True, ofa=True)
    assert method.name == "ee-ge-isc-ofa"
    assert EarlyExitMethod(10, 1, 10).name == "ee"
    assert method.train_setting(0, 5) is None
    assert method.eval_settings() == [1, 2, 3]
    gflops = [method.gflops(i, 16) for i in method.eval_settings()]
    assert gflops[0] == count_exit_flops(method.model, 1, HW) / 1e9
    cascade = method.exit_gflops(16)
    assert cascade.shape == (3,) and np.all(np.diff(cascade) > 0)
    init = functools.partial(method.init_variables, image_size=16)
    abstract = jax.eval_shape(init, jax.random.key(0))
    variables = _variables(method.model)
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)
    images = _images()
    probs = method.exit_probabilities(variables, images)
    assert probs.shape == (3, 4, 10)
    np.testing.assert_allclose(
        jax.nn.softmax(method.logits(variables, images, 2)), probs[1], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="alpha"):
        EarlyExitMethod(10, 1, 10, alpha=1.5)


def test_training_with_all_techniques_decreases_the_loss():
    method = EarlyExitMethod(10, 1, 10, ge=True, isc=True, ofa=True, temperature=3.0, alpha=0.5)
    variables = _variables(method.model)
    batch = {"image": _images(8, seed=3), "label": _labels(8)}
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state):
        (loss, (collections, logits)), grads = jax.value_and_grad(method.loss, has_aux=True)(
            variables["params"], variables, batch, None, jax.random.key(0)
        )
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {**variables, **collections, "params": params}, opt_state, loss, logits

    start = variables
    losses = []
    for _ in range(6):
        variables, opt_state, loss, logits = step(variables, opt_state)
        assert logits.shape == (8, 10)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0]
    # training batch norm updated the running statistics of the branches too
    for path in (("branch1", "block", "bn1"), ("block3", "bn1"), ("final_bn",)):
        before, after = start["batch_stats"], variables["batch_stats"]
        for key in path:
            before, after = before[key], after[key]
        assert np.any(after["full"]["mean"] != before["full"]["mean"])
