"""Benchmarks: ``python -m lbsgd.bench <subcommand> [flags]`` (``--help`` after a subcommand lists its flags).

==============  ==================================================================================
subcommand      what it times
==============  ==================================================================================
``allreduce``   ring and halving/doubling allreduce (Goyal et al. §4) against ``lax.psum``
``hlo``         the compiled train step's size (optimized HLO instructions), beside the Flax example's
``input``       the tf.data ImageNet input pipeline, images/s total and per host core
``step``        the real train step: images/s, step-time spread, FLOPs, MFU against a peak measured
                in the same run, peak device memory; ``--peer=flax`` times the Flax example beside it
``strategies``  one train step of every registered strategy, relative to allreduce
``workers``     m of Goyal's workers on one device: vmap vs accumulate vs one BN, with peak memory
==============  ==================================================================================

The dispatcher is ``lbsgd.bench.cli`` (``main(argv)``, ``SUBCOMMANDS``); this package imports nothing.
Shared: ``lbsgd.bench.harness`` (the step a run trains with, built by ``lbsgd.trainer.build`` from a run
config, and its timing), ``lbsgd.bench.common`` (one JSON writer, median and spread of timed repeats
with compilation timed apart, memory and peak-FLOP helpers), ``lbsgd.bench.flops`` (model FLOPs of a
jaxpr) and ``lbsgd.bench.peers`` (other implementations timed beside lbsgd). No subcommand imports JAX
before parsing its flags, so those that need simulated CPU devices can still ask XLA for them.
"""
