"""The paper's comparison (Fig. 2) sized for a 2-core CPU: WRN-16-1 on CIFAR-10.

    python -m sdpoint_jax.compare --config experiments/configs/compare_cifar10_quick.py \
        --workdir runs/compare --config.data.data_dir ../shared/data/tfds

Every method trains on the first 45,000 training images with the same data order,
schedule (2 epochs, x0.2 at 50% / 75%) and seed; the last 5,000 are held out to fit
the early exits' confidence thresholds (budgeted inference). SDPoint also reports
stochastic inference over 10 random instances. `--config.compare.methods='("dropout",
"stochastic-depth")'` adds the paper's Table 2 regularisers.
"""

from sdpoint_jax.config import cifar_config


def get_config():
    config = cifar_config("wrn-16-1", "cifar10")
    config.optim.num_epochs = 2
    config.optim.lr_drop_epochs = (1.0, 1.5)
    config.run.log_every_steps = 10
    config.run.checkpoint_every_steps = 200
    config.data.eval_batch_size = 500
    config.data.train_split = "train[:45000]"
    config.data.holdout_split = "train[45000:]"
    config.compare.methods = ("baseline", "sdpoint", "ms", "ee", "ee-ge-isc-ofa")
    config.compare.stochastic_passes = 10
    return config
