"""IMTA's system (MSDNet, then GE, ISC and OFA in two phases) beside SDPoint, sized for
a 2-core CPU: CIFAR-10.

    python -m sdpoint_jax.compare --config experiments/configs/compare_msdnet_cifar10_quick.py \
        --workdir runs/compare_msdnet --config.data.data_dir ../shared/data/tfds

The reduced MSDNet is ``msdnet-5-ch8-gr4``: IMTA's CIFAR setting (3 scales, ``lin_grow``
step 1, base 1, growth and bottleneck factors 1-2-4) with 5 exits, 8 base channels
and growth 4 instead of 7, 16 and 6: 1.45M parameters and 0.058 GFLOPs through all five
exits, against WRN-16-1's 0.054 GFLOPs (SDPoint's network). Every method trains on
the first 45,000 training images with the same data order and seed, phase I (and
every one-phase method) for 1 epoch (x0.1 at 50% and 75%, MSDNet's schedule shape),
phase II for 1 epoch (x0.1 at 50% and 75%); the last 5,000 images are held out to fit
the exits' confidence thresholds (budgeted batch classification). One epoch keeps the
seven methods within about 90 minutes on 2 idle cores.
"""

from sdpoint_jax.config import cifar_config


def get_config():
    config = cifar_config("wrn-16-1", "cifar10")
    config.optim.num_epochs = 1
    config.optim.lr_drop_epochs = (0.5, 0.75)
    config.optim.lr_decay = 0.1
    config.finetune.num_epochs = 1
    config.finetune.lr_drop_epochs = (0.5, 0.75)
    config.run.log_every_steps = 10
    config.run.checkpoint_every_steps = 200
    config.data.eval_batch_size = 500
    config.data.train_split = "train[:45000]"
    config.data.holdout_split = "train[45000:]"
    config.compare.msdnet = "msdnet-5-ch8-gr4"
    config.compare.methods = (
        "sdpoint",
        "msdnet",
        "msdnet-ge",
        "msdnet-imta",
        "ee",
        "ee-ge-isc-ofa",
        "ee-imta",
    )
    return config
