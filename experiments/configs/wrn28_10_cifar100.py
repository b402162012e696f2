"""wrn-28-10 on CIFAR-100 (paper Table 1 / Fig. 2).

`--config=THIS_FILE:baseline` trains without SDPoint.
"""

from sdpoint_jax.config import cifar_config


def get_config(variant=None):
    return cifar_config("wrn-28-10", "cifar100", variant=variant)
