"""densenet-bc-40-60 on CIFAR-10 (paper Table 1 / Fig. 2).

`--config=THIS_FILE:baseline` trains without SDPoint.
"""

from sdpoint_jax.config import cifar_config


def get_config(variant=None):
    return cifar_config("densenet-bc-40-60", "cifar10", variant=variant)
