"""Regularisation study on 2 CPU cores: SDPoint against the plain network, dropout and
stochastic depth (paper 000, Sect. 6.3, Table 2), and low mode's time to accuracy
(paper 003), over several seeds.

    python -m sdpoint_jax.compare --config experiments/configs/study_regularisation_cifar10.py \
        --workdir runs/study --config.data.data_dir ../shared/data/tfds

A rerun skips every finished (method, seed) run and resumes an interrupted one.

Regime. Table 2's effect is regularisation, which shows only where the plain network
over-fits; on the whole training set with augmentation a 2-core CPU cannot train long
enough for that. So: WRN-16-1 on a fixed class-balanced subset of the CIFAR-10 training
set, the first 256 images of each class (2,560 images, 20 steps of 128 per epoch, the
same for every seed) and **no data augmentation** (``data.augment = False``: training
images get the evaluation preprocessing), so the baseline fits its training set within
an affordable run. Test error is measured on the full 10,000 test images.

Schedule: the paper's SGD shape at 15 epochs (300 steps): learning rate 0.1, x0.2 at
50% and 75% (epochs 7.5 and 11.25), Nesterov momentum 0.9, weight decay 5e-4, batch 128.

Runs (``compare.seeds``, ``compare.single_seed_methods``): ``baseline`` and ``sdpoint``
at seeds 0, 1, 2; ``dropout`` (rate 0.3), ``stochastic-depth`` (last block 0.5),
``low`` and ``sdpoint+low`` (low mode with probability 0.5, ratio 2, full mode for half
an epoch after each drop) at seed 0 only. Each method's full-network test error is
logged every 2.5 epochs and at the end (``compare.monitor``: 6 points per learning
curve); the training error is the loop's per-step training-batch accuracy
(``run.log_every_steps = 1``). Stochastic inference (SDPoint, dropout, stochastic
depth) averages 20 passes, not Table 2's 50: 50 passes of dropout and stochastic depth
alone would take about 30 minutes here.

Projected time (AMD EPYC, 2 cores, measured: a WRN-16-1 train step of 128 images 1.57 s,
SDPoint steps about 87% of that, low-mode steps 35-90 ms; inference of 500 test images
0.87 s, so about 17-20 s per pass over the 10,000): training 300 steps is about 470 s
for a full-cost run, and the ten runs cost about 8.8 such runs (3 baseline, 3 x 0.87
SDPoint, dropout, stochastic depth, and about 0.6 each for the low-mode runs), 4,150 s;
the learning-curve evaluations 10 runs x 6 x 20 s = 1,200 s; the final evaluations
(SDPoint's 13 instances with both BN modes and 20 stochastic passes, about 400 s per
SDPoint run, x4; 20 passes of dropout and of stochastic depth, 2 x 370 s; the others
20 s each) about 2,400 s; compilation about 400 s. In all about 8,100 s, 2.25 hours.
"""

import ml_collections

from sdpoint_jax.config import cifar_config


def get_config():
    config = cifar_config("wrn-16-1", "cifar10")
    config.data.train_examples_per_class = 256
    config.data.augment = False
    config.optim.num_epochs = 15
    config.optim.lr_drop_epochs = (7.5, 11.25)
    config.low_mode.prob = 0.5
    config.low_mode.full_epochs_after_drop = 0.5
    config.compare.methods = (
        "baseline",
        "sdpoint",
        "dropout",
        "stochastic-depth",
        "low",
        "sdpoint+low",
    )
    config.compare.seeds = (0, 1, 2)
    config.compare.single_seed_methods = ("dropout", "stochastic-depth", "low", "sdpoint+low")
    config.compare.stochastic_passes = 20
    config.compare.monitor = True
    config.run.eval_every_epochs = 2.5
    config.run.log_every_steps = 1
    config.run.checkpoint_every_steps = 100
    config.data.eval_batch_size = 500
    # test accuracies (%) whose time to reach the study reports (baseline, low, sdpoint,
    # sdpoint+low), from the monitored learning curves
    config.time_to_accuracy = ml_collections.ConfigDict(
        {"accuracy_targets": (30.0, 35.0, 40.0, 45.0)}
    )
    return config
