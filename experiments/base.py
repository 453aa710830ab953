r"""Every config field at its default: the digits run (k=8 workers x n=16 on a ResNet-8).

Each field, its default, its type or choices and what it means is defined once, in
``lbsgd/config/schema.py``; the strategies' option sections (``dpsgd``, ``gossip``, ``easgd``,
``async_ps``, ...) come from the strategies themselves. The other experiment files start from this
config and override only what differs.

Command:
  python -m lbsgd.main --config=experiments/base.py --workdir=runs/base
"""

from lbsgd.config import schema


def get_config():
    """Returns every field at its default."""
    return schema.base_config()
