"""The memory-map budget: compiled programs are freed least recently used first before
a compile that would pass the process's cap, freeing gives the maps back, and a compile
with nothing left to free is a clear error instead of a crash inside XLA."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpoint_jax.training.programs import InstancePrograms
from sdpoint_jax.xla_cpu import memory_maps
from sdpoint_jax.xla_cpu.memory_maps import MapBudget, MemoryMapLimitError

EXAMPLE = (jax.ShapeDtypeStruct((8, 8), jnp.float32),)


def instance_programs(budget: MapBudget, traced: list) -> InstancePrograms:
    """Programs ``key -> 12 rounds of tanh(x @ x.T * (i + key)) + sort(x)``: a few
    dozen kernels each, every key a new function (so freeing one frees its code)."""

    def build(key: int):
        def program(x):
            traced.append(key)
            for i in range(12):
                x = jnp.tanh(x @ x.T * (i + key)) + jnp.sort(x, axis=0)
            return x

        return jax.jit(program)

    return InstancePrograms(build, EXAMPLE, "test programs", map_budget=budget)


def reference(key: int, x: np.ndarray) -> np.ndarray:
    for i in range(12):
        x = np.tanh(x @ x.T * (i + key)) + np.sort(x, axis=0)
    return x


def test_budget_arithmetic():
    budget = MapBudget(limit=10_000, count=lambda: 5_000, reserve=1_000)
    assert budget.expected_program_maps() == memory_maps.FIRST_PROGRAM_MAPS == 1_500
    assert budget.shortfall() == 0  # 5,000 + 1,500 + 1,000 <= 10,000
    assert budget.shortfall(3) == 5_000 + 3 * 1_500 + 1_000 - 10_000
    budget.record(2_000)
    assert budget.expected_program_maps() == 2_500  # 1.25 x the most seen
    budget.record(100)  # a smaller compile does not lower the estimate
    assert budget.shortfall(2) == 5_000 + 2 * 2_500 + 1_000 - 10_000


def test_unknown_limit_never_counts():
    def count() -> int:
        raise AssertionError("counted maps without a limit")

    budget = MapBudget(limit=None, count=count)
    assert budget.shortfall(100) == 0
    with budget.compiling():
        pass


def test_least_recently_used_programs_are_freed_and_compile_again():
    holders: list[InstancePrograms] = []
    # Every held program "holds" 1,000 maps: with 1,500 expected per compile, a compile
    # fits while at most 3 programs are held, so at most 4 are held after it.
    budget = MapBudget(
        limit=10_000, count=lambda: 5_000 + 1_000 * sum(map(len, holders)), reserve=0
    )
    traced: list = []
    programs = instance_programs(budget, traced)
    holders.append(programs)
    for key in (1, 2, 3, 4):
        programs[key]
    programs[1]  # now used more recently than 2, 3 and 4
    with pytest.warns(UserWarning, match="freeing the least recently used"):
        programs[5]  # frees 2
    assert (len(programs), programs.freed) == (4, 1)
    programs[2]  # frees 3, compiles 2 again
    assert (len(programs), programs.freed, budget.freed) == (4, 2, 2)
    assert traced == [1, 2, 3, 4, 5, 2]
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    for key in (1, 2, 4, 5):
        np.testing.assert_allclose(
            np.asarray(programs[key](jnp.asarray(x))), reference(key, x), rtol=1e-5, atol=1e-5
        )
    assert traced == [1, 2, 3, 4, 5, 2]  # all four were held

    # The loop above used them in the order 1, 2, 4, 5. Another holder on the same
    # budget: its compiles free the least recently used programs of either holder.
    others = instance_programs(budget, traced)
    holders.append(others)
    others[6]  # frees 1
    others[7]  # frees 2
    assert (len(programs), len(others), budget.freed) == (2, 2, 4)
    with budget.compiling():  # a compile outside any holder (evaluation's) frees 4
        pass
    assert (len(programs), len(others), budget.freed) == (1, 2, 5)
    programs[5]
    assert traced == [1, 2, 3, 4, 5, 2, 6, 7]  # 5 was still held


def test_a_compile_that_cannot_fit_is_a_clear_error_and_leaves_the_programs_usable():
    maps = {"count": 9_000}
    budget = MapBudget(limit=10_000, count=lambda: maps["count"], reserve=0)
    programs = instance_programs(budget, [])
    with pytest.raises(MemoryMapLimitError) as error:
        programs[1]
    message = str(error.value)
    for part in ("9,000", "10,000", "vm.max_map_count", "sudo sysctl -w vm.max_map_count="):
        assert part in message
    maps["count"] = 1_000  # room again: the failed compile left no count behind
    programs[1]
    assert (len(programs), programs.freed) == (1, 0)


def test_freeing_a_program_gives_its_maps_back():
    budget = MapBudget(limit=10**9, reserve=0)  # room for every program
    programs = instance_programs(budget, [])
    programs[0]  # also compiles what every program shares (thread pools, constants)
    gc.collect()  # what other tests left behind gives its maps back now, not below
    before = memory_maps.process_map_count()
    programs[1]
    one_program = memory_maps.process_map_count() - before
    assert one_program >= 20  # a few dozen kernels, three maps each

    held = memory_maps.process_map_count()
    # Room for one more program only once one of the two held gives its maps back.
    budget.limit = held + budget.expected_program_maps() - one_program // 2
    with pytest.warns(UserWarning, match="freeing"):
        programs[2]
    assert (len(programs), programs.freed) == (2, 1)
    assert abs(memory_maps.process_map_count() - held) < one_program // 2


def test_first_calls_of_each_key_run_inside_the_budget_and_later_ones_outside():
    held = {"maps": 10_000}
    budget = MapBudget(limit=20_000, count=lambda: held["maps"])
    first_calls = memory_maps.FirstCalls(budget)
    with first_calls(("a", (8, 8))):
        held["maps"] += 700  # what the compile added
    assert budget.expected_program_maps() == memory_maps.FIRST_PROGRAM_MAPS  # 1.25 x 700
    # now one map short of room for another compile: a new key is refused, a known one runs
    held["maps"] = 20_000 - memory_maps.RESERVE - memory_maps.FIRST_PROGRAM_MAPS + 1
    with first_calls(("a", (8, 8))):
        pass
    with pytest.raises(MemoryMapLimitError, match=r"vm\.max_map_count"), first_calls(("b", (8, 8))):
        pytest.fail("the call ran past the budget")
    # a refused key was not counted as compiled: it asks the budget again
    held["maps"] = 10_000
    with first_calls(("b", (8, 8))):
        held["maps"] += 2_000
    assert budget.expected_program_maps() == 2_500


def _full_budget() -> MapBudget:
    """A process 1 map short of room for one more program (and the maps kept free)."""
    limit = 100_000
    return MapBudget(
        limit=limit,
        count=lambda: limit - memory_maps.RESERVE - memory_maps.FIRST_PROGRAM_MAPS + 1,
    )


def _compile_sites(model, variables) -> dict:
    """The places that compile an inference program on a first call, besides
    evaluation, calibration and the server (tested with them): name -> a call that
    compiles one."""
    from sdpoint_jax.analysis.scale import scale_sensitivity
    from sdpoint_jax.bench.latency import measure
    from sdpoint_jax.core.instance import Instance
    from sdpoint_jax.evaluation.cascade import Cascade, instance_probabilities
    from tests.conftest import make_batches

    batches = [{**b, "mask": np.ones(5, np.int32)} for b in make_batches(7, count=1, size=5)]
    instance = Instance(2, 0.5)
    return {
        "instance_probabilities": lambda: instance_probabilities(
            model, variables, batches, [instance]
        ),
        "cascade": lambda: Cascade(model, variables, [instance], [1.0])(batches[0]["image"]),
        "bench latency": lambda: measure(
            model, variables, jnp.asarray(batches[0]["image"]), instance, repeats=1, warmup=0
        ),
        "scale_sensitivity": lambda: scale_sensitivity(
            model, variables, batches, factors=(1.0, 0.75)
        ),
    }


@pytest.mark.parametrize(
    "site", ["instance_probabilities", "cascade", "bench latency", "scale_sensitivity"]
)
def test_inference_programs_compile_inside_the_budget(site, tiny_wrn, monkeypatch):
    model, variables = tiny_wrn
    monkeypatch.setattr(memory_maps, "process_budget", _full_budget)
    with pytest.raises(MemoryMapLimitError, match=r"vm\.max_map_count"):
        _compile_sites(model, variables)[site]()
