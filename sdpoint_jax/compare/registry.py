"""The comparison's methods by name, built from a run config.

Names: ``baseline`` (the plain network), ``sdpoint`` (gives the UBN curve too, unless
``config.compare.ubn`` is False), ``low``
and ``sdpoint+low`` (the same with low mode, paper 003, after ``config.low_mode``; named
as the settings of :mod:`sdpoint_jax.compare.time_to_target`), ``ms``
(multiscale training, sizes ``config.compare.ms_min_size..ms_max_size``), ``ee`` (early
exits) and ``ee-ge-isc-ofa`` (with Gradient Equilibrium, Inline Subnetwork
Collaboration and one-for-all distillation at ``config.compare.ofa_temperature`` /
``ofa_alpha``), ``dropout`` (``config.compare.dropout_rate``) and ``stochastic-depth``
(``config.compare.stochastic_depth``). Early exits, dropout and stochastic depth need a WRN.

MSDNet (``config.compare.msdnet``, e.g. ``msdnet-7``; the registry's name grammar):
``msdnet`` (joint training on the summed exit losses), ``msdnet-ge`` (the same with
Gradient Equilibrium: IMTA's phase I) and ``msdnet-imta`` (IMTA's two phases, see
:mod:`sdpoint_jax.compare.two_phase`). ``ee-imta`` applies the two phases to the
early-exit WRN (phase I is ``ee-ge``). The techniques of the two-phase methods are the
switches ``config.compare.imta_ge`` (phase I), ``imta_isc`` and ``imta_ofa`` (phase
II); with any off the method is named by those on, e.g. ``msdnet-ge-then-ofa``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections

from sdpoint_jax.compare.early_exit import EarlyExitMethod, ExitMethod
from sdpoint_jax.compare.method import Method
from sdpoint_jax.compare.multiscale import MultiscaleMethod
from sdpoint_jax.compare.regularised import RegularisedMethod
from sdpoint_jax.compare.sdpoint import SDPointMethod
from sdpoint_jax.compare.time_to_target import setting_config
from sdpoint_jax.compare.two_phase import FineTuneMethod
from sdpoint_jax.data.specs import dataset_spec
from sdpoint_jax.models import create
from sdpoint_jax.training.run import steps_per_epoch
from sdpoint_jax.training.schedules import low_mode_schedule

Builder = Callable[[ml_collections.ConfigDict, int], Method]


def _sdpoint(setting: str) -> Builder:
    """The network trained as the time-to-accuracy ``setting`` (``baseline``, ``low``,
    ``sdpoint``, ``sdpoint+low``): SDPoint and low mode switched by
    :func:`~sdpoint_jax.compare.time_to_target.setting_config` (``baseline`` and
    ``sdpoint`` never run low mode, whatever ``config.low_mode`` says)."""

    def build(config: ml_collections.ConfigDict, num_classes: int) -> Method:
        switched = setting_config(config, setting)
        low_mode = None
        if "low" in setting:
            low_mode = low_mode_schedule(switched, steps_per_epoch(switched))
        return SDPointMethod(
            config.model.name,
            num_classes,
            sdpoint=switched.sdpoint.enabled,
            bn_modes=("instance", "uniform") if config.compare.ubn else ("instance",),
            ratios=tuple(config.sdpoint.ratios),
            low_mode=low_mode,
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


def _early_exits(ge: bool, isc_ofa: bool) -> Callable[..., ExitMethod]:
    def build(config: ml_collections.ConfigDict, num_classes: int) -> ExitMethod:
        match = re.fullmatch(r"wrn-(\d+)-(\d+)", config.model.name)
        if not match:
            raise ValueError(f"early exits are built on a WRN (wrn-D-W), got {config.model.name!r}")
        return EarlyExitMethod(
            int(match[1]),
            int(match[2]),
            num_classes,
            ge=ge,
            isc=isc_ofa,
            ofa=isc_ofa,
            temperature=config.compare.ofa_temperature,
            alpha=config.compare.ofa_alpha,
        )

    return build


def _msdnet(ge: bool) -> Callable[..., ExitMethod]:
    def build(config: ml_collections.ConfigDict, num_classes: int) -> ExitMethod:
        name = config.compare.msdnet
        if not name.startswith("msdnet-"):
            raise ValueError(f"compare.msdnet must name an MSDNet (msdnet-K...), got {name!r}")
        model = create(name, num_classes=num_classes, ge=ge, dtype=jnp.dtype(config.model.dtype))
        return ExitMethod(
            model, name="msdnet-ge" if ge else "msdnet", architecture=("compare.msdnet",)
        )

    return build


def _two_phase(family: str, phase_one: Callable[[bool], Callable[..., ExitMethod]]) -> Builder:
    """IMTA's two phases on ``family``'s network: phase I built by ``phase_one(ge)``."""

    def build(config: ml_collections.ConfigDict, num_classes: int) -> Method:
        ge, isc, ofa = (config.compare[f"imta_{t}"] for t in ("ge", "isc", "ofa"))
        first = phase_one(ge)(config, num_classes)
        if ge and isc and ofa:
            name = f"{family}-imta"
        else:
            after = [t for t, on in (("isc", isc), ("ofa", ofa)) if on]
            name = "-".join([first.name, "then", *after] if after else [first.name, "then-ft"])
        return FineTuneMethod(
            first,
            isc=isc,
            ofa=ofa,
            temperature=config.compare.ofa_temperature,
            alpha=config.compare.ofa_alpha,
            name=name,
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
    "baseline": _sdpoint("baseline"),
    "sdpoint": _sdpoint("sdpoint"),
    "low": _sdpoint("low"),
    "sdpoint+low": _sdpoint("sdpoint+low"),
    "ms": _multiscale,
    "ee": _early_exits(False, False),
    "ee-ge": _early_exits(True, False),
    "ee-ge-isc-ofa": _early_exits(True, True),
    "ee-imta": _two_phase("ee", lambda ge: _early_exits(ge, False)),
    "msdnet": _msdnet(False),
    "msdnet-ge": _msdnet(True),
    "msdnet-imta": _two_phase("msdnet", _msdnet),
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
