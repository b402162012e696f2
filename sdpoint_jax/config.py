"""Run configurations (``ml_collections``), with the papers' hyper-parameters.

Config files under ``experiments/configs/`` call these builders; any field can be
overridden on the command line (``--config.batch_size=64``). A config file's argument
``baseline`` (``--config=FILE:baseline``) turns SDPoint off: the plain network trained
with the same code, data and schedule.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from sdpoint_jax.training.programs import default_compile_workers


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every run."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_dir = config_dict.placeholder(str)  # None: TFDS_DATA_DIR, then tfds's default
    c.train_split = config_dict.placeholder(str)  # None: the data set's; or "train[:45000]"
    c.model = "wrn-16-1"
    c.sdpoint = True
    c.ratios = (0.5, 0.75)
    c.bn_mode = "instance"  # or "uniform" (UBN: one set of statistics)
    c.dtype = "float32"  # compute dtype; "bfloat16" for accelerators
    c.conv_lowering = "auto"  # "xla", "matmul_grad" (fast CPU training); auto by backend
    # low mode (sdpoint_jax.core.lowmode, paper 003): off while every probability is 0
    c.low_mode_prob = 0.0  # p_low of every epoch
    c.low_mode_epoch_probs = config_dict.placeholder(tuple)  # or one p_low per epoch
    c.low_mode_ratio = 2  # integer input/kernel downsampling ratio r >= 2
    c.low_mode_resize = "gaussian"  # or "bilinear"
    c.full_mode_epochs_after_drop = 4.0  # full mode only, this long after each LR drop
    c.seed = 0
    # optimisation
    c.batch_size = 128
    c.num_epochs = 400
    c.max_steps = config_dict.placeholder(int)  # stop this invocation early (resume later)
    c.learning_rate = 0.1
    c.lr_drop_epochs = (200, 300)
    c.lr_decay = 0.2
    c.momentum = 0.9
    c.weight_decay = 5e-4
    # logging, evaluation, checkpoints, compilation
    c.log_every_steps = 50
    c.eval_every_epochs = 1.0
    c.eval_batch_size = 500
    c.eval_split = config_dict.placeholder(str)  # None: the data set's test split; or "test[:1000]"
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.precompile = False
    c.compile_workers = default_compile_workers()  # one per CPU core, at most 8
    c.compile_cache_dir = config_dict.placeholder(str)  # None: ~/.cache/sdpoint_jax/xla
    # instance-specific BN calibration: K fixed training batches, augmented as in
    # training (False: evaluation preprocessing)
    c.calibration_batches = 8
    c.calibration_augment = True
    # comparison methods (python -m sdpoint_jax.compare)
    c.methods = ("baseline", "sdpoint")
    c.ms_min_size, c.ms_max_size = 16, 32  # multiscale training input sizes
    c.ofa_temperature, c.ofa_alpha = 1.0, 0.1  # one-for-all distillation (early exits)
    c.dropout_rate = 0.3  # WRN dropout between the convs of each block
    c.stochastic_depth = 0.5  # drop rate of the last block, linear decay
    c.stochastic_passes = 0  # >0: also stochastic inference averaged over this many passes
    # held-out training images (e.g. "train[45000:]" with train_split "train[:45000]"):
    # the confidence thresholds of early exits and of `evaluate --cascade` are fit there
    c.holdout_split = config_dict.placeholder(str)
    c.budget_points = 8  # budgeted inference (exits, cascade): average-cost targets
    return c


def _apply_variant(c: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
    if variant not in (None, "", "sdpoint", "baseline"):
        raise ValueError(f"config variant must be 'sdpoint' or 'baseline', got {variant!r}")
    c.sdpoint = variant != "baseline"
    return c


def cifar_config(
    model: str, dataset: str, *, variant: str | None = None
) -> ml_collections.ConfigDict:
    """The paper's CIFAR setting: 400 epochs, drops at 50% and 75% (WRN: x0.2, batch
    128, weight decay 5e-4; DenseNet-BC: x0.1, batch 64, weight decay 1e-4)."""
    c = base_config()
    c.dataset, c.model = dataset, model
    c.num_epochs = 400
    c.lr_drop_epochs = (200, 300)
    if model.startswith("densenet"):
        c.batch_size, c.weight_decay, c.lr_decay = 64, 1e-4, 0.1
    else:
        c.batch_size, c.weight_decay, c.lr_decay = 128, 5e-4, 0.2
    return _apply_variant(c, variant)


def imagenet_config(model: str, *, variant: str | None = None) -> ml_collections.ConfigDict:
    """ImageNet as in the authors' code: batch 256, 115 epochs, x0.1 at 40, 75, 105,
    weight decay 1e-4."""
    c = base_config()
    c.dataset, c.model = "imagenet2012", model
    c.batch_size, c.eval_batch_size = 256, 250
    c.num_epochs = 115
    c.lr_drop_epochs = (40, 75, 105)
    c.lr_decay = 0.1
    c.weight_decay = 1e-4
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
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
        config.data_dir = data_dir
    return config


def config_from_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config a checkpoint was written with (its JSON ``config`` item): fields the
    checkpoint predates keep :func:`base_config`'s defaults; JSON lists become tuples."""

    def as_tuples(value: Any) -> Any:
        return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value

    config = base_config()
    for key, value in saved.items():
        config[key] = as_tuples(value)
    return config
