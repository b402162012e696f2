"""wrn-40-4 on CIFAR-10 (paper Table 1 / Fig. 2).

`--config=THIS_FILE:baseline` trains without SDPoint.
"""

from sdpoint_jax.config import cifar_config


def get_config(variant=None):
    return cifar_config("wrn-40-4", "cifar10", variant=variant)
