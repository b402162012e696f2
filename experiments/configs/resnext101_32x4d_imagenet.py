"""resnext-101-32x4d on ImageNet (paper Table 3, Fig. 3/4).

`--config=THIS_FILE:baseline` trains without SDPoint.
"""

from sdpoint_jax.config import imagenet_config


def get_config(variant=None):
    return imagenet_config("resnext-101-32x4d", variant=variant)
