"""FLOPs and parameters: the paper's numbers, XLA's count, and the CLI."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import pytest

from sdpoint_jax.core.instance import Instance
from sdpoint_jax.core.layers import AdaptivePool
from sdpoint_jax.core.pooling import _max_gather_indices, bin_element_count
from sdpoint_jax.flops import main
from sdpoint_jax.models import create
from sdpoint_jax.models.cost import abstract_variables, count_flops, count_params, instance_costs
from tests.conftest import record_calls

# Paper Tables 1 and 3: (params in M, full-instance GFLOPs, N).
PAPER = {
    "wrn-28-10": (36.5, 10.5, 12, 32, 10),
    "wrn-40-4": (8.9, 2.6, 18, 32, 10),
    "densenet-bc-40-60": (4.3, 3.6, 12, 32, 10),
    "preresnet-101": (44.7, 15.7, 34, 224, 1000),
    "resnext-101-32x4d": (44.3, 16.0, 34, 224, 1000),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_architectures_match_tables_1_and_3(name):
    params_m, gflops, points, size, classes = PAPER[name]
    model = create(name, num_classes=classes)
    assert model.num_points == points
    assert count_params(model, (size, size)) / 1e6 == pytest.approx(params_m, rel=0.02)
    flops = count_flops(model, Instance.full(), (size, size))
    assert flops / 1e9 == pytest.approx(gflops, rel=0.02)


def test_instance_costs_fall_with_earlier_points_and_lower_ratios():
    model = create("wrn-16-2")
    costs = {c.instance: c.flops for c in instance_costs(model, (32, 32))}
    full = costs[Instance.full()]
    n = model.num_points
    for point in range(1, n):
        assert costs[Instance(point, 0.5)] < costs[Instance(point, 0.75)] < full
        assert costs[Instance(point, 0.5)] < costs[Instance(point + 1, 0.5)]
    # After the last block only the final BN-ReLU and global pool shrink: 8x8 -> 4x4
    # saves more than the pooling costs, 8x8 -> 6x6 (overlapping bins) does not.
    assert costs[Instance(n, 0.5)] < full < costs[Instance(n, 0.75)]
    assert costs[Instance(1, 0.5)] < 0.4 * full


def _xla_flops(model, variables, instance, hw):
    forward = jax.jit(functools.partial(model.apply, instance=instance, train=False))
    return forward.lower(variables, jnp.zeros((1, *hw, 3))).cost_analysis()["flops"]


@pytest.mark.parametrize(("name", "hw"), [("wrn-10-1", (32, 32)), ("resnet-18", (64, 64))])
def test_counts_agree_with_xla_cost_analysis(name, hw):
    """XLA's HLO cost analysis skips conv taps on zero padding and prices adaptive
    pooling as what it is lowered to: per axis, average pooling is a reshape-mean (one op
    per input element) where the size divides, else an einsum (2 ops per input element
    and output row); max pooling is ``L`` gathers and ``L - 1`` element-wise maxima,
    ``L`` the longest bin. With ``conv_taps="valid"`` and the pooling term swapped
    accordingly, the counts must agree to 0.1% (the remainder is per-channel work such
    as ``rsqrt(var + eps)`` that the paper's convention ignores)."""
    model = create(name)
    variables = abstract_variables(model, hw)  # the counts need shapes only
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    for instance in [Instance.full(), Instance(1, 0.5), Instance(2, 0.75)]:
        ours = count_flops(model, instance, hw, conv_taps="valid")
        for (_, h, w, c), (_, oh, ow, _) in record_calls(
            model, variables, x, instance, AdaptivePool, abstract=True
        ):
            ours -= c * bin_element_count(h, oh) * bin_element_count(w, ow)
            if getattr(model, "stem_point", False) and instance.point == 1:  # stem: max pool
                longest_h, longest_w = (len(_max_gather_indices(*io)) for io in ((h, oh), (w, ow)))
                ours += c * ((2 * longest_h - 1) * oh * w + (2 * longest_w - 1) * oh * ow)
            else:
                for elements, size, out in ((h * w * c, h, oh), (oh * w * c, w, ow)):
                    ours += elements if size % out == 0 else 2 * out * elements
        assert _xla_flops(model, variables, instance, hw) == pytest.approx(ours, rel=1e-3)


def test_all_taps_exceed_valid_taps_by_the_padding():
    model = create("wrn-10-1")
    all_taps = count_flops(model, Instance.full(), (8, 8))
    valid = count_flops(model, Instance.full(), (8, 8), conv_taps="valid")
    # stem 3x3 conv on 8x8, 3 input channels, 16 outputs: 64*9 taps vs (8*3-2)^2 valid
    assert all_taps > valid
    with pytest.raises(ValueError, match="conv_taps must be one of"):
        count_flops(model, Instance.full(), (8, 8), conv_taps="some")


def test_cli_json_rows(capsys):
    main(["--model", "wrn-10-1", "--dataset", "cifar100", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 3 + 1
    assert set(rows[0]) >= {"point", "ratio", "flops", "params"}
    assert rows[0]["point"] == 0 and rows[0]["fraction"] == 1.0
    assert {(r["point"], r["ratio"]) for r in rows[1:]} == {
        (p, r) for p in (1, 2, 3) for r in (0.5, 0.75)
    }
    assert len({r["params"] for r in rows}) == 1


def test_cli_table_and_errors(capsys):
    main(["--model", "wrn-10-1", "--instances", "full,2:0.5"])
    out = capsys.readouterr().out
    assert "N = 3 points" in out and "GFLOPs" in out
    assert len(out.strip().splitlines()) == 2 + 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "wrn-11-1"])
    assert exit_info.value.code == 2 and "6n + 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "wrn-10-1", "--instances", "9:0.5"])
    assert exit_info.value.code == 2
    assert "point 9 is out of range" in capsys.readouterr().err
