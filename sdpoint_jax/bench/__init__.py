"""Speed benchmarks of SDPoint instances: ``python -m sdpoint_jax.bench COMMAND ...``.

Commands:
  latency   inference latency of every instance and batch size, against its FLOPs
  train     images/s of the train step: full network, cheapest instance, SDPoint mix;
            with --host-memory, once per host memory mode (and --record the fastest)
  compile   wall time to compile all ``2N + 1`` train-step programs: one by one, in
            parallel, and from a warm persistent compilation cache
  input     decoded and augmented training images/s of the input pipeline, per core

Each writes a JSON file and prints a table; see the modules of the same names.
"""
