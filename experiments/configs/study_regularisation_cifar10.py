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

Projected time, from figures measured on this machine (AMD EPYC, 2 cores shared with
other jobs): a WRN-16-1 train step of 128 images 1.57 s idle and 1.7-2.1 s under load
(1.85 s assumed), SDPoint steps about 87 % of that, low-mode steps 35-90 ms; a pass of
the full network over the 10,000 test images 17 s (0.87 s per 500); SDPoint's final
evaluation (its 13 instances, then 20 stochastic passes) 380 s with the UBN curve,
about 240 s without it (``compare.ubn = False`` here). Training 300 steps: 555 s per
plain run (x3 baseline, dropout, stochastic depth), 480 s per SDPoint run (x3), about
310 s and 270 s for ``low`` and ``sdpoint+low``: 4,800 s. Learning-curve evaluations:
10 runs x 6 x 17 s = 1,020 s. Final evaluations: 4 x 240 s (SDPoint runs), 2 x 360 s
(dropout and stochastic depth: deterministic, then 20 stochastic passes of 17 s), 4 x
20 s (the others): 1,760 s. Start-up and compilation about 300 s. In all about
7,900 s, 2.2 hours.
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
    config.compare.ubn = False  # the UBN curve is not part of the study
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
