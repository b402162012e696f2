"""The nested config: every config file builds the values of the flat layout it
replaced, the architectures' defaults come from the model registry, flat saved configs
are migrated, and command-line overrides use the dotted paths."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from sdpoint_jax.config import (
    LEGACY_PATHS,
    base_config,
    cifar_config,
    config_from_saved,
    flatten,
    get_field,
    is_legacy,
    load_config,
    migrate_legacy,
    set_field,
)
from sdpoint_jax.models import TrainingDefaults, training_defaults
from sdpoint_jax.training.programs import default_compile_workers
from tests.conftest import tiny_cifar10_config

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"

# What the flat config of the previous version held (``base_config().to_dict()``, but
# ``compile_workers``, which depends on the machine), and what each config file changed.
OLD_BASE = {
    "batch_size": 128,
    "bn_mode": "instance",
    "budget_points": 8,
    "calibration_augment": True,
    "calibration_batches": 8,
    "checkpoint_every_steps": 1000,
    "compile_cache_dir": None,
    "conv_lowering": "auto",
    "data_dir": None,
    "dataset": "cifar10",
    "dropout_rate": 0.3,
    "dtype": "float32",
    "eval_batch_size": 500,
    "eval_every_epochs": 1.0,
    "eval_split": None,
    "full_mode_epochs_after_drop": 4.0,
    "holdout_split": None,
    "keep_checkpoints": 3,
    "learning_rate": 0.1,
    "log_every_steps": 50,
    "low_mode_epoch_probs": None,
    "low_mode_prob": 0.0,
    "low_mode_ratio": 2,
    "low_mode_resize": "gaussian",
    "lr_decay": 0.2,
    "lr_drop_epochs": (200, 300),
    "max_steps": None,
    "methods": ("baseline", "sdpoint"),
    "model": "wrn-16-1",
    "momentum": 0.9,
    "ms_max_size": 32,
    "ms_min_size": 16,
    "num_epochs": 400,
    "ofa_alpha": 0.1,
    "msdnet": "msdnet-7",
    "imta_ge": True,
    "imta_isc": True,
    "imta_ofa": True,
    "finetune_num_epochs": 180,
    "finetune_learning_rate": 0.1,
    "finetune_lr_drop_epochs": (90, 135),
    "finetune_lr_decay": 0.1,
    "ofa_temperature": 1.0,
    "precompile": False,
    "ratios": (0.5, 0.75),
    "sdpoint": True,
    "seed": 0,
    "stochastic_depth": 0.5,
    "stochastic_passes": 0,
    "train_split": None,
    "weight_decay": 0.0005,
}
# Fields added after the flat layout (they have no flat name), with their defaults; a
# config file's changes name them by their dotted path.
ADDED_FIELDS = {
    "data.train_examples_per_class": None,
    "data.augment": True,
    "compare.ubn": True,
    "compare.monitor": False,
    "compare.seeds": None,
    "compare.single_seed_methods": (),
    "compile.cpu_optimization_level": None,
}
_QUICK = {"checkpoint_every_steps": 200, "lr_drop_epochs": (1.0, 1.5), "num_epochs": 2}
_DENSENET = {"batch_size": 64, "lr_decay": 0.1, "weight_decay": 0.0001}
_IMAGENET = {
    "batch_size": 256,
    "checkpoint_every_steps": 2000,
    "dataset": "imagenet2012",
    "eval_batch_size": 250,
    "log_every_steps": 100,
    "lr_decay": 0.1,
    "lr_drop_epochs": (40, 75, 105),
    "num_epochs": 115,
    "weight_decay": 0.0001,
}
OLD_CHANGES = {
    "cifar10_quick.py": {**_QUICK, "log_every_steps": 10, "precompile": True},
    "compare_msdnet_cifar10_quick.py": {
        **_QUICK,
        "num_epochs": 1,
        "lr_drop_epochs": (0.5, 0.75),
        "lr_decay": 0.1,
        "finetune_num_epochs": 1,
        "finetune_lr_drop_epochs": (0.5, 0.75),
        "msdnet": "msdnet-5-ch8-gr4",
        "holdout_split": "train[45000:]",
        "log_every_steps": 10,
        "methods": (
            "sdpoint",
            "msdnet",
            "msdnet-ge",
            "msdnet-imta",
            "ee",
            "ee-ge-isc-ofa",
            "ee-imta",
        ),
        "train_split": "train[:45000]",
    },
    "compare_cifar10_quick.py": {
        **_QUICK,
        "holdout_split": "train[45000:]",
        "log_every_steps": 10,
        "methods": ("baseline", "sdpoint", "ms", "ee", "ee-ge-isc-ofa"),
        "stochastic_passes": 10,
        "train_split": "train[:45000]",
    },
    "densenet_bc40_60_cifar10.py": {**_DENSENET, "model": "densenet-bc-40-60"},
    "densenet_bc40_60_cifar100.py": {
        **_DENSENET,
        "dataset": "cifar100",
        "model": "densenet-bc-40-60",
    },
    "lowmode_cifar10_quick.py": {
        "accuracy_targets": (50.0, 60.0, 65.0, 70.0),
        "checkpoint_every_steps": 200,
        "eval_every_epochs": 0.25,
        "full_mode_epochs_after_drop": 0.25,
        "holdout_split": "train[45000:]",
        "log_every_steps": 20,
        "low_mode_prob": 0.5,
        "lr_drop_epochs": (1.5, 2.25),
        "num_epochs": 3,
        "precompile": True,
        "train_split": "train[:45000]",
        "training_settings": ("baseline", "low", "sdpoint", "sdpoint+low"),
    },
    "preresnet101_imagenet.py": {**_IMAGENET, "model": "preresnet-101"},
    "study_regularisation_cifar10.py": {
        "data.train_examples_per_class": 256,
        "data.augment": False,
        "num_epochs": 15,
        "lr_drop_epochs": (7.5, 11.25),
        "low_mode_prob": 0.5,
        "full_mode_epochs_after_drop": 0.5,
        "methods": ("baseline", "sdpoint", "dropout", "stochastic-depth", "low", "sdpoint+low"),
        "compare.seeds": (0, 1, 2),
        "compare.single_seed_methods": ("dropout", "stochastic-depth", "low", "sdpoint+low"),
        "stochastic_passes": 20,
        "compare.ubn": False,
        "compare.monitor": True,
        "eval_every_epochs": 2.5,
        "log_every_steps": 1,
        "checkpoint_every_steps": 100,
        "accuracy_targets": (30.0, 35.0, 40.0, 45.0),
    },
    "resnext101_32x4d_imagenet.py": {**_IMAGENET, "model": "resnext-101-32x4d"},
    "wrn28_10_cifar10.py": {"model": "wrn-28-10"},
    "wrn28_10_cifar100.py": {"dataset": "cifar100", "model": "wrn-28-10"},
    "wrn40_4_cifar10.py": {"model": "wrn-40-4"},
    "wrn40_4_cifar100.py": {"dataset": "cifar100", "model": "wrn-40-4"},
}
# config files with a ``baseline`` variant (``FILE:baseline``)
WITH_VARIANT = sorted(
    set(OLD_CHANGES)
    - {
        "compare_cifar10_quick.py",
        "compare_msdnet_cifar10_quick.py",
        "lowmode_cifar10_quick.py",
        "study_regularisation_cifar10.py",
    }
)


def nested_expectation(changes: dict) -> dict:
    """The flat layout's defaults, the fields added since, then ``changes`` (flat names
    or, for added fields, dotted paths), all by dotted path."""
    fields = {**OLD_BASE, **ADDED_FIELDS, **changes}
    expected = {LEGACY_PATHS.get(name, name): value for name, value in fields.items()}
    expected["compile.workers"] = default_compile_workers()
    return expected


def test_every_config_file_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.py")) == sorted(OLD_CHANGES)


@pytest.mark.parametrize("name", sorted(OLD_CHANGES))
def test_config_files_build_the_values_of_the_flat_layout(name):
    built = flatten(load_config(str(CONFIGS / name)))
    assert built == nested_expectation(OLD_CHANGES[name])


@pytest.mark.parametrize("name", WITH_VARIANT)
def test_baseline_variant_turns_sdpoint_off(name):
    built = flatten(load_config(f"{CONFIGS / name}:baseline"))
    expected = nested_expectation({**OLD_CHANGES[name], "sdpoint": False})
    assert built == expected and built["sdpoint.enabled"] is False


def test_bad_variant_is_an_error():
    with pytest.raises(ValueError, match="variant must be 'sdpoint' or 'baseline', got 'fast'"):
        cifar_config("wrn-16-1", "cifar10", variant="fast")


def test_layout_groups():
    groups = {k: v for k, v in base_config().items() if isinstance(v, ml_collections.ConfigDict)}
    assert sorted(groups) == [
        "cascade",
        "compare",
        "compile",
        "data",
        "finetune",
        "low_mode",
        "model",
        "optim",
        "run",
        "sdpoint",
    ]
    assert sorted(base_config()) == sorted([*groups, "seed"])


def test_legacy_paths_cover_the_old_fields_once():
    paths = list(LEGACY_PATHS.values())
    assert len(paths) == len(set(paths))
    assert set(OLD_BASE) | {"compile_workers"} <= set(LEGACY_PATHS)
    # every field of the defaults has its old name, or was added since
    only_in_some_files = {path for path in paths if path.startswith("time_to_accuracy.")}
    assert set(flatten(base_config())) == set(paths) - only_in_some_files | set(ADDED_FIELDS)
    assert not set(paths) & set(ADDED_FIELDS)


def test_architecture_defaults_come_from_the_registry():
    assert training_defaults("wrn-28-10") == TrainingDefaults(128, 5e-4, 0.2)
    assert training_defaults("DenseNet-BC-40-60") == TrainingDefaults(64, 1e-4, 0.1)
    assert training_defaults("resnext-101-32x4d") == TrainingDefaults(256, 1e-4, 0.1)
    config = cifar_config("densenet-bc-100-12", "cifar100")
    assert (config.optim.batch_size, config.optim.weight_decay, config.optim.lr_decay) == (
        64,
        1e-4,
        0.1,
    )
    with pytest.raises(ValueError, match="unknown model 'lenet-5'"):
        cifar_config("lenet-5", "cifar10")


def test_flat_saved_config_is_migrated_and_missing_fields_keep_defaults():
    saved = {"model": "wrn-10-1", "batch_size": 64, "lr_drop_epochs": [1.0, 1.5], "sdpoint": False}
    assert is_legacy(saved)
    config = config_from_saved(saved)
    assert config.model.name == "wrn-10-1" and config.optim.batch_size == 64
    assert config.optim.lr_drop_epochs == (1.0, 1.5)  # JSON lists become tuples
    assert config.sdpoint.enabled is False
    assert config.low_mode.prob == 0.0 and config.optim.weight_decay == 5e-4  # defaults
    expected = flatten(base_config())
    expected.update(
        {
            "model.name": "wrn-10-1",
            "optim.batch_size": 64,
            "optim.lr_drop_epochs": (1.0, 1.5),
            "sdpoint.enabled": False,
        }
    )
    assert flatten(config) == expected


def test_flat_time_to_accuracy_fields_get_their_group():
    config = config_from_saved({"dataset": "cifar10", "accuracy_targets": [50.0]})
    assert config.time_to_accuracy.accuracy_targets == (50.0,)


def test_unknown_flat_field_is_an_error():
    with pytest.raises(ValueError, match=r"unknown fields \['lr_warmup'\]"):
        migrate_legacy({"model": "wrn-10-1", "lr_warmup": 5})


def test_nested_saved_config_round_trips():
    config = load_config(str(CONFIGS / "lowmode_cifar10_quick.py"))
    saved = config.to_dict()
    assert not is_legacy(saved)
    assert flatten(config_from_saved(saved)) == flatten(config)


def test_field_paths():
    config = base_config()
    assert get_field(config, "optim.batch_size") == 128
    set_field(config, "optim.batch_size", 32)
    assert config.optim.batch_size == 32
    with pytest.raises(KeyError, match=r"no field 'optim\.batch'"):
        get_field(config, "optim.batch")
    with pytest.raises(KeyError, match="no field 'batch_size'"):
        tiny_cifar10_config({"batch_size": 8})


def test_command_line_overrides_use_dotted_paths():
    argv = [
        "prog",
        f"--config={CONFIGS / 'cifar10_quick.py'}:baseline",
        "--config.optim.num_epochs=10",
        "--config.data.data_dir=/tmp/tfds",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "run config", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    config = flag_values.config
    assert config.optim.num_epochs == 10 and config.data.data_dir == "/tmp/tfds"
    assert config.sdpoint.enabled is False and config.model.name == "wrn-16-1"


def test_program_fingerprint_leaves_out_the_nested_paths_of_not_in_programs():
    from sdpoint_jax.models import create
    from sdpoint_jax.training.steps import NOT_IN_PROGRAMS, program_fingerprint

    model = create("wrn-10-1", num_classes=10)
    config = base_config()
    reference = program_fingerprint(config, model, 10)
    for path in NOT_IN_PROGRAMS:
        get_field(config, path)  # each is a field of the layout
    set_field(config, "run.max_steps", 3)
    set_field(config, "data.data_dir", "/elsewhere")
    set_field(config, "compile.workers", 1)
    assert program_fingerprint(config, model, 10) == reference
    set_field(config, "optim.batch_size", 64)
    assert program_fingerprint(config, model, 10) != reference
