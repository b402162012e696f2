"""The comparison's methods by name, built from a run config.

Names: ``baseline`` (the plain network), ``sdpoint`` (gives the UBN curve too), ``ms``
(multiscale training, sizes ``config.compare.ms_min_size..ms_max_size``), ``ee`` (early
exits) and ``ee-ge-isc-ofa`` (with Gradient Equilibrium, Inline Subnetwork
Collaboration and one-for-all distillation at ``config.compare.ofa_temperature`` /
``ofa_alpha``), ``dropout`` (``config.compare.dropout_rate``) and ``stochastic-depth``
(``config.compare.stochastic_depth``). Early exits, dropout and stochastic depth need a WRN.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import ml_collections

from sdpoint_jax.compare.early_exit import EarlyExitMethod
from sdpoint_jax.compare.method import Method
from sdpoint_jax.compare.multiscale import MultiscaleMethod
from sdpoint_jax.compare.regularised import RegularisedMethod
from sdpoint_jax.compare.sdpoint import SDPointMethod
from sdpoint_jax.data.specs import dataset_spec

Builder = Callable[[ml_collections.ConfigDict, int], Method]


def _sdpoint(sdpoint: bool) -> Builder:
    def build(config: ml_collections.ConfigDict, num_classes: int) -> Method:
        return SDPointMethod(
            config.model.name,
            num_classes,
            sdpoint=sdpoint,
            ratios=tuple(config.sdpoint.ratios),
        )

    return build


def _multiscale(config: ml_collections.ConfigDict, num_classes: int) -> Method:
    return MultiscaleMethod(
        config.model.name,
        num_classes,
        min_size=config.compare.ms_min_size,
        max_size=config.compare.ms_max_size,
        name="ms",
    )


def _early_exits(techniques: bool) -> Builder:
    def build(config: ml_collections.ConfigDict, num_classes: int) -> Method:
        match = re.fullmatch(r"wrn-(\d+)-(\d+)", config.model.name)
        if not match:
            raise ValueError(f"early exits are built on a WRN (wrn-D-W), got {config.model.name!r}")
        return EarlyExitMethod(
            int(match[1]),
            int(match[2]),
            num_classes,
            ge=techniques,
            isc=techniques,
            ofa=techniques,
            temperature=config.compare.ofa_temperature,
            alpha=config.compare.ofa_alpha,
        )

    return build


def _regularised(option: str, name: str) -> Builder:
    def build(config: ml_collections.ConfigDict, num_classes: int) -> Method:
        return RegularisedMethod(
            config.model.name,
            num_classes,
            **{option: config.compare[option]},
            name=name,
        )

    return build


BUILDERS: dict[str, Builder] = {
    "baseline": _sdpoint(False),
    "sdpoint": _sdpoint(True),
    "ms": _multiscale,
    "ee": _early_exits(False),
    "ee-ge-isc-ofa": _early_exits(True),
    "dropout": _regularised("dropout_rate", "dropout"),
    "stochastic-depth": _regularised("stochastic_depth", "stochastic-depth"),
}


def build_method(name: str, config: ml_collections.ConfigDict) -> Method:
    """The method called ``name`` (one of :data:`BUILDERS`) for ``config``'s model and
    data set."""
    if name not in BUILDERS:
        raise ValueError(f"unknown comparison method {name!r}; choose from {sorted(BUILDERS)}")
    num_classes = dataset_spec(config.data.dataset).num_classes
    return BUILDERS[name](config, num_classes)
