"""Strategies: how k workers combine. One self-registering module each (``registry.register``).

============  ============================================================  ==============
name          what the workers share                                        module
============  ============================================================  ==============
allreduce     one copy; gradients summed over all k (Goyal et al.)          ``allreduce``
dpsgd         nothing; neighbour averaging on a topology (Lian et al.)      ``dpsgd``
gossip_pull   nothing; average with one random peer (Jin et al.)            ``gossip``
gossip_push   nothing; push-sum with one peer (Jin et al.; Assran et al.)   ``gossip``
easgd         a centre variable, pulled elastically (Zhang et al.)          ``easgd``
async_ps      a server copy; workers compute on stale pulls (Dean et al.)   ``async_ps``
local_sgd     nothing between averages every H steps (Stich; Lin et al.)    ``local_sgd``
============  ============================================================  ==============

``from_config(config, num_devices)`` builds the one named by ``config.strategy``;
``check_config(config)`` rejects, in one line each, unknown strategies and topologies, topologies
that need more workers than k, bad option values, and options that belong to another strategy.
Importing this package registers the built-in strategies; a strategy defined elsewhere registers
itself with ``registry.register`` and is then usable by name like these.
"""

from __future__ import annotations

# Registration order is the order of tables and comparisons: one import per line, in that order.
from lbsgd.strategies import registry  # isort: skip
from lbsgd.strategies import allreduce  # isort: skip
from lbsgd.strategies import dpsgd  # isort: skip
from lbsgd.strategies import gossip  # isort: skip
from lbsgd.strategies import easgd  # isort: skip
from lbsgd.strategies import async_ps  # isort: skip
from lbsgd.strategies import local_sgd  # isort: skip
from lbsgd.strategies.allreduce import Allreduce
from lbsgd.strategies.async_ps import AsyncPS
from lbsgd.strategies.base import StepContext, Strategy
from lbsgd.strategies.dpsgd import DPSGD
from lbsgd.strategies.easgd import EASGD
from lbsgd.strategies.gossip import GossipPull, GossipPush
from lbsgd.strategies.local_sgd import LocalSGD
from lbsgd.strategies.registry import REGISTRY, check_config, options, register, topology_of

from_config = registry.build

__all__ = [
    "DPSGD",
    "EASGD",
    "Allreduce",
    "AsyncPS",
    "GossipPull",
    "GossipPush",
    "LocalSGD",
    "REGISTRY",
    "StepContext",
    "Strategy",
    "allreduce",
    "async_ps",
    "check_config",
    "dpsgd",
    "easgd",
    "from_config",
    "gossip",
    "local_sgd",
    "options",
    "register",
    "registry",
    "topology_of",
]
