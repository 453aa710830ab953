"""Peers of ``python -m lbsgd.bench step``: other implementations' train steps, timed beside lbsgd's in the
same run on the same model, batch and devices.

==========  =====================================================================================
module      peer
==========  =====================================================================================
``flax``    the Flax ImageNet example's ``train_step`` (google/flax ``examples/imagenet``, imported by
            path from a checkout): ``--peer=flax --flax_dir=PATH``
==========  =====================================================================================
"""
