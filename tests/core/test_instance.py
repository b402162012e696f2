"""Tests of SDPoint instances, instance spaces, sampling and downsampled sizes."""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.core.instance import (
    DEFAULT_RATIOS,
    FULL_KEY,
    Instance,
    InstanceSpace,
    downsampled_size,
)

# --------------------------------------------------------------------------- Instance


def test_full_instance_normalises_ratio() -> None:
    full = Instance.full()
    assert full.point == 0 and full.ratio == 1.0 and full.is_full
    assert Instance(0, 0.5) == full
    assert Instance(0) == full
    assert Instance(0, 0.75) == Instance(0, 0.5)
    assert hash(Instance(0, 0.5)) == hash(full)
    assert not Instance(3, 0.5).is_full


def test_instance_is_hashable_and_comparable() -> None:
    a, b, c = Instance(3, 0.5), Instance(3, 0.5), Instance(3, 0.75)
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c, Instance.full(), Instance(0, 0.5)}) == 3
    assert {a: "x"}[b] == "x"
    assert sorted([c, Instance(1, 0.75), a, Instance.full()]) == [
        Instance.full(),
        Instance(1, 0.75),
        a,
        c,
    ]


def test_instance_is_immutable() -> None:
    instance = Instance(3, 0.5)
    with pytest.raises(AttributeError):
        instance.point = 4  # type: ignore[misc]


def test_instance_normalises_numpy_types() -> None:
    instance = Instance(np.int64(3), np.float64(0.5))
    assert type(instance.point) is int and type(instance.ratio) is float
    assert instance == Instance(3, 0.5)
    assert hash(instance) == hash(Instance(3, 0.5))


def test_instance_as_static_jit_argument() -> None:
    traces = []

    def f(x: jax.Array, instance: Instance) -> jax.Array:
        traces.append(instance)
        return x * instance.ratio + instance.point

    jitted = jax.jit(f, static_argnames="instance")
    x = jnp.arange(3.0)
    np.testing.assert_allclose(jitted(x, instance=Instance(3, 0.5)), [3.0, 3.5, 4.0])
    np.testing.assert_allclose(jitted(x, instance=Instance(3, 0.5)), [3.0, 3.5, 4.0])
    assert len(traces) == 1  # an equal instance reuses the compiled program
    np.testing.assert_allclose(jitted(x, instance=Instance(2, 0.75)), [2.0, 2.75, 3.5])
    assert len(traces) == 2
    np.testing.assert_allclose(jitted(x, instance=Instance.full()), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(jitted(x, instance=Instance(0, 0.5)), [0.0, 1.0, 2.0])
    assert len(traces) == 3  # every spelling of the full network is one program


def test_instance_static_argnums_positional() -> None:
    jitted = jax.jit(lambda x, instance: x * instance.ratio, static_argnums=1)
    assert float(jitted(jnp.float32(4.0), Instance(1, 0.75))) == 3.0


@pytest.mark.parametrize(
    ("instance", "key", "text"),
    [
        (Instance(3, 0.5), "p3_r0p5", "3:0.5"),
        (Instance(12, 0.75), "p12_r0p75", "12:0.75"),
        (Instance(1, 0.25), "p1_r0p25", "1:0.25"),
        (Instance.full(), FULL_KEY, "full"),
    ],
)
def test_key_and_str(instance: Instance, key: str, text: str) -> None:
    assert instance.key == key
    assert str(instance) == text
    assert Instance.parse(text) == instance
    assert re.fullmatch(r"[A-Za-z0-9_]+", instance.key)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("3:0.5", Instance(3, 0.5)),
        ("12:0.75", Instance(12, 0.75)),
        (" 3:0.5 ", Instance(3, 0.5)),
        ("full", Instance.full()),
        ("0", Instance.full()),
        ("0:0.5", Instance.full()),
    ],
)
def test_parse(text: str, want: Instance) -> None:
    assert Instance.parse(text) == want


@pytest.mark.parametrize("text", ["3-0.5", "x:y", "", "3", "3:", ":0.5", "3:0.5:1", "3.0:0.5"])
def test_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"cannot parse instance .*expected 'P:R'") as info:
        Instance.parse(text)
    assert repr(text.strip()) in str(info.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("3:1.5", r"ratio must lie in the open interval \(0, 1\) for point 3, got 1\.5"),
        ("-1:0.5", r"point must be >= 0, got -1"),
    ],
)
def test_parse_reports_invalid_values(text: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        Instance.parse(text)


@pytest.mark.parametrize("point", [-1, -7])
def test_invalid_point(point: int) -> None:
    with pytest.raises(ValueError, match=rf"point must be >= 0, got {point}"):
        Instance(point, 0.5)


@pytest.mark.parametrize("point", [1.5, 2.0, "3", True, None])
def test_non_integer_point(point: object) -> None:
    with pytest.raises(
        ValueError, match=rf"point must be an integer >= 0, got {re.escape(repr(point))}"
    ):
        Instance(point, 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ratio", "shown"),
    [(0, "0"), (0.0, "0.0"), (1.0, "1.0"), (1.5, "1.5"), (-0.5, "-0.5"), (math.nan, "nan")],
)
def test_invalid_ratio(ratio: float, shown: str) -> None:
    pattern = rf"ratio must lie in the open interval \(0, 1\) for point 3, got {re.escape(shown)}"
    with pytest.raises(ValueError, match=pattern):
        Instance(3, ratio)


def test_infinite_ratio() -> None:
    with pytest.raises(ValueError, match=r"open interval \(0, 1\).*got inf"):
        Instance(2, math.inf)


# ----------------------------------------------------------------------- InstanceSpace


@pytest.mark.parametrize("num_points", [0, 1, 4, 16])
def test_space_enumerates_2n_plus_1(num_points: int) -> None:
    space = InstanceSpace(num_points)
    instances = list(space)
    assert space.ratios == DEFAULT_RATIOS == (0.5, 0.75)
    assert len(instances) == len(space) == 2 * num_points + 1
    assert len(set(instances)) == len(instances)
    assert len({instance.key for instance in instances}) == len(instances)
    assert instances[0] == Instance.full()
    assert all(not instance.is_full for instance in instances[1:])
    assert {(i.point, i.ratio) for i in instances[1:]} == {
        (p, r) for p in range(1, num_points + 1) for r in DEFAULT_RATIOS
    }
    assert all(instance in space for instance in instances)
    assert all(space.validate(instance) is instance for instance in instances)


def test_space_order_and_custom_ratios() -> None:
    space = InstanceSpace(2, ratios=(0.75, 0.5, 0.25))
    assert list(space) == [
        Instance.full(),
        Instance(1, 0.75),
        Instance(1, 0.5),
        Instance(1, 0.25),
        Instance(2, 0.75),
        Instance(2, 0.5),
        Instance(2, 0.25),
    ]
    assert len(space) == 7


def test_space_is_hashable() -> None:
    assert InstanceSpace(4) == InstanceSpace(4, [0.5, 0.75])  # type: ignore[arg-type]
    assert hash(InstanceSpace(4)) == hash(InstanceSpace(4, [0.5, 0.75]))  # type: ignore[arg-type]


def test_contains() -> None:
    space = InstanceSpace(4)
    assert Instance(4, 0.75) in space
    assert Instance(5, 0.5) not in space
    assert Instance(2, 0.6) not in space
    assert "full" not in space
    assert (0, 1.0) not in space


def test_validate_rejects_point_out_of_range() -> None:
    space = InstanceSpace(4)
    with pytest.raises(ValueError, match=r"point 5 is out of range.*points 0\.\.4"):
        space.validate(Instance(5, 0.5))


def test_validate_rejects_ratio_not_in_space() -> None:
    space = InstanceSpace(4)
    with pytest.raises(ValueError, match=r"ratio 0\.6 is not one of .*\(0\.5, 0\.75\)"):
        space.validate(Instance(2, 0.6))


def test_validate_rejects_non_instance() -> None:
    with pytest.raises(ValueError, match=r"expected an Instance, got str: '3:0\.5'"):
        InstanceSpace(4).validate("3:0.5")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_points": -1}, r"num_points must be >= 0, got -1"),
        ({"num_points": 2.0}, r"num_points must be an integer >= 0, got 2\.0"),
        ({"num_points": True}, r"num_points must be an integer >= 0, got True"),
        ({"num_points": 2, "ratios": ()}, r"ratios must not be empty"),
        ({"num_points": 2, "ratios": (0.5, 1.0)}, r"every ratio must lie in \(0, 1\), got 1\.0"),
        ({"num_points": 2, "ratios": (0.0,)}, r"every ratio must lie in \(0, 1\), got 0\.0"),
        ({"num_points": 2, "ratios": (0.5, 0.5)}, r"ratios must be distinct"),
    ],
)
def test_invalid_space(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        InstanceSpace(**kwargs)


def test_parse_list() -> None:
    space = InstanceSpace(12)
    assert space.parse_list("all") == list(space)
    assert space.parse_list("full,3:0.5,12:0.75") == [
        Instance.full(),
        Instance(3, 0.5),
        Instance(12, 0.75),
    ]
    assert space.parse_list("3:0.5,") == [Instance(3, 0.5)]
    with pytest.raises(ValueError, match=r"points 0\.\.12"):
        space.parse_list("full,13:0.5")
    with pytest.raises(ValueError, match=r"cannot parse instance '3-0\.5'"):
        space.parse_list("full,3-0.5")


# ---------------------------------------------------------------------------- sample


def test_sample_numpy_members_and_deterministic() -> None:
    space = InstanceSpace(4)
    first = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert len(set(first)) == 1  # same seed, same draw
    rng_a, rng_b = np.random.default_rng(123), np.random.default_rng(123)
    draws_a = [space.sample(rng_a) for _ in range(200)]
    draws_b = [space.sample(rng_b) for _ in range(200)]
    assert draws_a == draws_b
    assert all(instance in space for instance in draws_a)
    assert len(set(draws_a)) == len(space)  # 200 draws reach all 9 instances


def test_sample_jax_members_and_deterministic() -> None:
    space = InstanceSpace(4)
    for make_key in (jax.random.PRNGKey, jax.random.key):
        key = make_key(0)
        assert space.sample(key) == space.sample(make_key(0))
        draws = [space.sample(k) for k in jax.random.split(key, 60)]
        assert draws == [space.sample(k) for k in jax.random.split(make_key(0), 60)]
        assert all(isinstance(instance, Instance) and instance in space for instance in draws)
        assert len(set(draws)) > 3


def test_sample_returns_static_python_values() -> None:
    instance = InstanceSpace(4).sample(jax.random.key(1))
    assert type(instance.point) is int and type(instance.ratio) is float
    hash(instance)


def test_sample_single_point_space_only_full() -> None:
    space = InstanceSpace(0)
    rng = np.random.default_rng(0)
    assert {space.sample(rng) for _ in range(20)} == {Instance.full()}
    assert space.sample(jax.random.key(0)) == Instance.full()


def test_sample_frequencies() -> None:
    """Point is uniform over {0..N}, ratio uniform over R, independently (Algorithm 1).

    With n draws a cell of probability q has count std sqrt(n q (1 - q)); the test allows
    5 standard deviations (about 2.8% of n for q = 1/5, 2.1% for q = 1/10).
    """
    num_points, n = 4, 20_000
    space = InstanceSpace(num_points)
    rng = np.random.default_rng(2018)
    counts = collections.Counter(space.sample(rng) for _ in range(n))
    assert set(counts) == set(space)

    def check(count: int, q: float) -> None:
        tolerance = 5.0 * math.sqrt(n * q * (1.0 - q))
        assert abs(count - n * q) <= tolerance, (count, n * q, tolerance)

    check(counts[Instance.full()], 1.0 / (num_points + 1))
    cell = 1.0 / ((num_points + 1) * len(space.ratios))
    for instance in list(space)[1:]:
        check(counts[instance], cell)
    for point in range(1, num_points + 1):
        check(sum(c for i, c in counts.items() if i.point == point), 1.0 / (num_points + 1))


# ------------------------------------------------------------------ downsampled_size


@pytest.mark.parametrize(
    ("size", "ratio", "want"),
    [
        (14, 0.75, 10),  # 10.5 -> 10 (half to even)
        (7, 0.5, 4),  # 3.5 -> 4
        (5, 0.5, 2),  # 2.5 -> 2
        (32, 0.75, 24),
        (56, 0.75, 42),
        (28, 0.5, 14),
        (112, 0.25, 28),
        (9, 0.5, 4),
    ],
)
def test_downsampled_size(size: int, ratio: float, want: int) -> None:
    got = downsampled_size(size, ratio)
    assert got == want == round(ratio * size)
    assert type(got) is int
