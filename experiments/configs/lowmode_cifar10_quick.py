"""Time to accuracy on 2 CPU cores: plain, low mode (paper 003), SDPoint, both.

WRN-16-1 on CIFAR-10 for 3 epochs on the first 45,000 training images (learning rate
x0.2 at 1.5 and 2.25 epochs), full network evaluated on the 10,000 test images every
quarter epoch. The last 5,000 training images are held out (``data.holdout_split``: the
confidence cascade fits its thresholds there, ``evaluate --cascade``). Low-mode settings run
a step in low mode (input and 3x3 kernels downsampled by 2) with probability 0.5, full
mode for a quarter epoch after each learning-rate drop (the paper's 4 epochs of 200,
scaled to the short schedule). Run with
``python -m sdpoint_jax.time_to_accuracy --config THIS_FILE --workdir DIR``.
"""

import ml_collections

from sdpoint_jax.config import cifar_config


def get_config():
    config = cifar_config("wrn-16-1", "cifar10")
    config.data.train_split = "train[:45000]"
    config.data.holdout_split = "train[45000:]"
    config.optim.num_epochs = 3
    config.optim.lr_drop_epochs = (1.5, 2.25)
    config.low_mode.prob = 0.5
    config.low_mode.full_epochs_after_drop = 0.25
    config.run.eval_every_epochs = 0.25
    config.run.log_every_steps = 20
    config.run.checkpoint_every_steps = 200
    config.compile.precompile = True
    config.time_to_accuracy = ml_collections.ConfigDict(
        {
            "training_settings": ("baseline", "low", "sdpoint", "sdpoint+low"),
            "accuracy_targets": (50.0, 60.0, 65.0, 70.0),
        }
    )
    return config
