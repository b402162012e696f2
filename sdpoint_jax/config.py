"""Run configurations (``ml_collections``), with the papers' hyper-parameters.

Fields are grouped by concern:

* ``seed``
* ``model``: ``name``, ``dtype``
* ``data``: ``dataset``, ``data_dir``, ``train_split``, ``eval_split``,
  ``holdout_split``, ``eval_batch_size``, ``train_examples_per_class`` (None: the whole
  training split; K: its first K examples of each class, a fixed class-balanced
  subset), ``augment`` (False: training images get the evaluation preprocessing)
* ``optim``: ``batch_size``, ``num_epochs``, ``learning_rate``, ``lr_drop_epochs``,
  ``lr_decay``, ``momentum``, ``weight_decay``
* ``sdpoint``: ``enabled``, ``ratios``, ``bn_mode``, ``calibration_batches``,
  ``calibration_augment``
* ``low_mode``: ``prob``, ``epoch_probs``, ``ratio``, ``resize``,
  ``full_epochs_after_drop``
* ``finetune``: the schedule of a two-phase method's phase II (IMTA's fine-tuning of
  the classifiers' last layers): ``num_epochs``, ``learning_rate``, ``lr_drop_epochs``,
  ``lr_decay`` (momentum, weight decay and batch size are ``optim``'s)
* ``compare`` (``python -m sdpoint_jax.compare``): ``methods``, ``ms_min_size``,
  ``ms_max_size``, ``ofa_temperature``, ``ofa_alpha``, ``msdnet`` (the MSDNet of the
  ``msdnet*`` methods), ``imta_ge``, ``imta_isc``, ``imta_ofa`` (the techniques of
  the two-phase methods ``msdnet-imta`` and ``ee-imta``), ``dropout_rate``,
  ``stochastic_depth``, ``stochastic_passes``, ``ubn`` (also evaluate SDPoint methods with
  uniform BN statistics), ``monitor`` (log each method's test
  error while it trains), ``seeds`` (None: one run seeded by ``seed``; a tuple: one run
  per seed), ``single_seed_methods`` (methods run at ``seeds[0]`` only)
* ``cascade``: ``budget_points``
* ``run``: ``max_steps``, ``log_every_steps``, ``eval_every_epochs``,
  ``checkpoint_every_steps``, ``keep_checkpoints``
* ``compile``: ``precompile``, ``workers``, ``cache_dir``, ``conv_lowering``,
  ``cpu_optimization_level``
* ``time_to_accuracy`` (only in configs that report times to accuracy targets:
  ``python -m sdpoint_jax.time_to_accuracy``, e.g.
  ``experiments/configs/lowmode_cifar10_quick.py``, with ``training_settings`` and
  ``accuracy_targets``; a study of the comparison, with ``accuracy_targets``)

Config files under ``experiments/configs/`` call these builders; any field can be
overridden on the command line (``--config.optim.batch_size=64``). A config file's
argument ``baseline`` (``--config=FILE:baseline``) turns SDPoint off
(``sdpoint.enabled=False``): the plain network trained with the same code, data and
schedule. Configs saved flat, before the groups, are read through :data:`LEGACY_PATHS`
(:func:`config_from_saved`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from sdpoint_jax.models import training_defaults
from sdpoint_jax.training.programs import default_compile_workers

LEGACY_PATHS: dict[str, str] = {
    "seed": "seed",
    "model": "model.name",
    "dtype": "model.dtype",
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "train_split": "data.train_split",
    "eval_split": "data.eval_split",
    "holdout_split": "data.holdout_split",
    "eval_batch_size": "data.eval_batch_size",
    "batch_size": "optim.batch_size",
    "num_epochs": "optim.num_epochs",
    "learning_rate": "optim.learning_rate",
    "lr_drop_epochs": "optim.lr_drop_epochs",
    "lr_decay": "optim.lr_decay",
    "momentum": "optim.momentum",
    "weight_decay": "optim.weight_decay",
    "sdpoint": "sdpoint.enabled",
    "ratios": "sdpoint.ratios",
    "bn_mode": "sdpoint.bn_mode",
    "calibration_batches": "sdpoint.calibration_batches",
    "calibration_augment": "sdpoint.calibration_augment",
    "low_mode_prob": "low_mode.prob",
    "low_mode_epoch_probs": "low_mode.epoch_probs",
    "low_mode_ratio": "low_mode.ratio",
    "low_mode_resize": "low_mode.resize",
    "full_mode_epochs_after_drop": "low_mode.full_epochs_after_drop",
    "methods": "compare.methods",
    "ms_min_size": "compare.ms_min_size",
    "ms_max_size": "compare.ms_max_size",
    "ofa_temperature": "compare.ofa_temperature",
    "ofa_alpha": "compare.ofa_alpha",
    "msdnet": "compare.msdnet",
    "imta_ge": "compare.imta_ge",
    "imta_isc": "compare.imta_isc",
    "imta_ofa": "compare.imta_ofa",
    "finetune_num_epochs": "finetune.num_epochs",
    "finetune_learning_rate": "finetune.learning_rate",
    "finetune_lr_drop_epochs": "finetune.lr_drop_epochs",
    "finetune_lr_decay": "finetune.lr_decay",
    "dropout_rate": "compare.dropout_rate",
    "stochastic_depth": "compare.stochastic_depth",
    "stochastic_passes": "compare.stochastic_passes",
    "budget_points": "cascade.budget_points",
    "max_steps": "run.max_steps",
    "log_every_steps": "run.log_every_steps",
    "eval_every_epochs": "run.eval_every_epochs",
    "checkpoint_every_steps": "run.checkpoint_every_steps",
    "keep_checkpoints": "run.keep_checkpoints",
    "precompile": "compile.precompile",
    "compile_workers": "compile.workers",
    "compile_cache_dir": "compile.cache_dir",
    "conv_lowering": "compile.conv_lowering",
    "training_settings": "time_to_accuracy.training_settings",
    "accuracy_targets": "time_to_accuracy.accuracy_targets",
}
"""Each field of the flat config of earlier versions -> its dotted path now."""


def _group(**fields: Any) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every run, by group (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _group(
        name="wrn-16-1",
        dtype="float32",  # compute dtype; "bfloat16" for accelerators
    )
    c.data = _group(
        dataset="cifar10",
        data_dir=config_dict.placeholder(str),  # None: TFDS_DATA_DIR, then tfds's default
        train_split=config_dict.placeholder(str),  # None: the data set's; or "train[:45000]"
        eval_split=config_dict.placeholder(str),  # None: the data set's test split
        # held-out training images (e.g. "train[45000:]" with train_split "train[:45000]"):
        # the confidence thresholds of early exits and of `evaluate --cascade` are fit there
        holdout_split=config_dict.placeholder(str),
        eval_batch_size=500,
        # K: train on the first K examples of each class of the training split
        train_examples_per_class=config_dict.placeholder(int),
        augment=True,  # random crop and flip of training images (False: none)
    )
    c.optim = _group(
        batch_size=128,
        num_epochs=400,
        learning_rate=0.1,
        lr_drop_epochs=(200, 300),
        lr_decay=0.2,  # factor of each drop
        momentum=0.9,
        weight_decay=5e-4,
    )
    c.sdpoint = _group(
        enabled=True,  # False: the plain network, same code, data and schedule
        ratios=(0.5, 0.75),
        bn_mode="instance",  # or "uniform" (UBN: one set of statistics)
        # instance-specific BN calibration: K fixed training batches, augmented as in
        # training (False: evaluation preprocessing)
        calibration_batches=8,
        calibration_augment=True,
    )
    # phase II of two-phase methods (IMTA Sect. 4, CIFAR: 180 epochs, drops at 90 and 135)
    c.finetune = _group(
        num_epochs=180,
        learning_rate=0.1,
        lr_drop_epochs=(90, 135),
        lr_decay=0.1,
    )
    # low mode (sdpoint_jax.core.lowmode, paper 003): off while every probability is 0
    c.low_mode = _group(
        prob=0.0,  # p_low of every epoch
        epoch_probs=config_dict.placeholder(tuple),  # or one p_low per epoch
        ratio=2,  # integer input/kernel downsampling ratio r >= 2
        resize="gaussian",  # or "bilinear"
        full_epochs_after_drop=4.0,  # full mode only, this long after each LR drop
    )
    # comparison methods (python -m sdpoint_jax.compare)
    c.compare = _group(
        methods=("baseline", "sdpoint"),
        ms_min_size=16,  # multiscale training input sizes
        ms_max_size=32,
        ofa_temperature=1.0,  # one-for-all distillation (early exits)
        ofa_alpha=0.1,
        msdnet="msdnet-7",  # the network of the msdnet, msdnet-ge and msdnet-imta methods
        imta_ge=True,  # two-phase methods: GE in phase I, ISC and OFA in phase II
        imta_isc=True,
        imta_ofa=True,
        dropout_rate=0.3,  # WRN dropout between the convs of each block
        stochastic_depth=0.5,  # drop rate of the last block, linear decay
        stochastic_passes=0,  # >0: also stochastic inference averaged over this many passes
        ubn=True,  # SDPoint methods also evaluated with uniform BN statistics (UBN curve)
        monitor=False,  # True: each method's test error every run.eval_every_epochs
        seeds=config_dict.placeholder(tuple),  # None: one run seeded by `seed`
        single_seed_methods=(),  # with seeds: methods run at seeds[0] only
    )
    c.cascade = _group(budget_points=8)  # budgeted inference (exits, cascade): cost targets
    c.run = _group(
        max_steps=config_dict.placeholder(int),  # stop this invocation early (resume later)
        log_every_steps=50,
        eval_every_epochs=1.0,
        checkpoint_every_steps=1000,
        keep_checkpoints=3,
    )
    c.compile = _group(
        precompile=False,
        workers=default_compile_workers(),  # one per CPU core, at most 8
        cache_dir=config_dict.placeholder(str),  # None: ~/.cache/sdpoint_jax/xla
        conv_lowering="auto",  # "xla", "matmul_grad" (fast CPU training); auto by backend
        # XLA:CPU backend optimisation level of train programs, 0-3 (None: XLA's, 3);
        # 1 compiles faster at the same step time, not bit-identical to 3
        cpu_optimization_level=config_dict.placeholder(int),
    )
    return c


def _apply_variant(c: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
    if variant not in (None, "", "sdpoint", "baseline"):
        raise ValueError(f"config variant must be 'sdpoint' or 'baseline', got {variant!r}")
    c.sdpoint.enabled = variant != "baseline"
    return c


def _with_model(model: str, dataset: str) -> ml_collections.ConfigDict:
    """:func:`base_config` for ``model`` on ``dataset``, with the architecture's default
    batch size, weight decay and learning-rate decay (:func:`models.training_defaults`)."""
    c = base_config()
    c.model.name, c.data.dataset = model, dataset
    defaults = training_defaults(model)
    c.optim.batch_size = defaults.batch_size
    c.optim.weight_decay = defaults.weight_decay
    c.optim.lr_decay = defaults.lr_decay
    return c


def cifar_config(
    model: str, dataset: str, *, variant: str | None = None
) -> ml_collections.ConfigDict:
    """The paper's CIFAR setting: 400 epochs, drops at 50% and 75%; batch size, weight
    decay and drop factor are the architecture's (WRN: batch 128, weight decay 5e-4,
    x0.2; DenseNet-BC: batch 64, weight decay 1e-4, x0.1)."""
    c = _with_model(model, dataset)
    c.optim.num_epochs = 400
    c.optim.lr_drop_epochs = (200, 300)
    return _apply_variant(c, variant)


def imagenet_config(model: str, *, variant: str | None = None) -> ml_collections.ConfigDict:
    """ImageNet as in the authors' code: 115 epochs, drops at 40, 75, 105; the
    architecture's batch size, weight decay and drop factor (the ImageNet nets: batch
    256, weight decay 1e-4, x0.1)."""
    c = _with_model(model, "imagenet2012")
    c.data.eval_batch_size = 250
    c.optim.num_epochs = 115
    c.optim.lr_drop_epochs = (40, 75, 105)
    c.run.log_every_steps = 100
    c.run.checkpoint_every_steps = 2000
    return _apply_variant(c, variant)


def load_config(spec: str, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` of the config file ``FILE`` (or ``get_config(ARG)`` for
    ``FILE:ARG``), as ``--config`` of :mod:`sdpoint_jax.main` does; ``data_dir``, if
    given, replaces the config's ``data_dir``. ``FileNotFoundError`` if there is no file."""
    path, separator, argument = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(argument) if separator else module.get_config()
    if data_dir is not None:
        config.data.data_dir = data_dir
    return config


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """Every leaf of a (nested) config by its dotted path, e.g. ``"optim.batch_size"``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            flat[key] = value
    return flat


def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
    """The value at dotted ``path`` (``"optim.batch_size"``); ``KeyError`` naming the path
    if there is none."""
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, ml_collections.ConfigDict) or part not in value:
            raise KeyError(f"the config has no field {path!r}")
        value = value[part]
    return value


def set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    """Sets the field at dotted ``path``, creating the groups above it if missing."""
    *groups, name = path.split(".")
    for group in groups:
        if group not in config:
            config[group] = ml_collections.ConfigDict()
        config = config[group]
    config[name] = value


def is_legacy(saved: Mapping[str, Any]) -> bool:
    """Whether ``saved`` has the flat layout of configs written before the groups: a
    field of :data:`LEGACY_PATHS` at the top level that is not a group."""
    return any(
        name in saved and not isinstance(saved[name], Mapping)
        for name in LEGACY_PATHS
        if name != "seed"
    )


def migrate_legacy(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A flat (old) saved config as dotted paths of the nested layout.

    Raises:
      ValueError: a field this version does not know.
    """
    unknown = sorted(set(saved) - set(LEGACY_PATHS))
    if unknown:
        raise ValueError(f"the saved config has unknown fields {unknown}")
    return {LEGACY_PATHS[name]: value for name, value in saved.items()}


def config_from_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config a checkpoint was written with (its JSON ``config`` item), nested or
    flat (written before the groups; migrated by :data:`LEGACY_PATHS`): fields the
    checkpoint predates keep :func:`base_config`'s defaults; JSON lists become tuples."""
    paths = migrate_legacy(saved) if is_legacy(saved) else flatten(saved)
    config = base_config()
    for path, value in paths.items():
        set_field(config, path, _as_tuples(value))
    return config
