"""A CPU-sized SDPoint run on CIFAR-10: WRN-16-1, 2 epochs (12 to 16 minutes on 2 cores).

`--config=THIS_FILE:baseline` trains the same network without SDPoint.
"""

from sdpoint_jax.config import cifar_config


def get_config(variant=None):
    config = cifar_config("wrn-16-1", "cifar10", variant=variant)
    config.optim.num_epochs = 2
    config.optim.lr_drop_epochs = (1.0, 1.5)
    config.run.log_every_steps = 10
    config.run.checkpoint_every_steps = 200
    config.compile.precompile = True
    return config
