"""Strategies: how k workers combine (GUIDE §6). One module each, one registry line each.

============  ============================================================  ==============
name          what the workers share                                        module
============  ============================================================  ==============
allreduce     one copy; gradients summed over all k (Goyal et al.)          ``allreduce``
dpsgd         nothing; neighbour averaging on a topology (Lian et al.)      ``dpsgd``
gossip_pull   nothing; average with one random peer (Jin et al.)            ``gossip``
gossip_push   nothing; push-sum with one peer (Jin et al.; Assran et al.)   ``gossip``
easgd         a centre variable, pulled elastically (Zhang et al.)          ``easgd``
async_ps      a server copy; workers compute on stale pulls (Dean et al.)   ``async_ps``
============  ============================================================  ==============

``from_config(config, num_devices)`` builds the one named by ``config.strategy``;
``check_config(config)`` rejects, in one line each, unknown strategies and topologies, topologies
that need more workers than k, bad option values, and options that belong to another strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from lbsgd.parallel import mixing
from lbsgd.strategies import async_ps, dpsgd, easgd, gossip
from lbsgd.strategies.allreduce import Allreduce
from lbsgd.strategies.async_ps import AsyncPS
from lbsgd.strategies.base import StepContext, Strategy
from lbsgd.strategies.dpsgd import DPSGD
from lbsgd.strategies.easgd import EASGD
from lbsgd.strategies.gossip import GossipPull, GossipPush

__all__ = [
    "DPSGD",
    "EASGD",
    "Allreduce",
    "AsyncPS",
    "GossipPull",
    "GossipPush",
    "REGISTRY",
    "STRATEGIES",
    "StepContext",
    "Strategy",
    "check_config",
    "from_config",
    "topology_of",
]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered strategy: its builder, accepted topologies (first = default) and config section."""

    build: Callable  # (config, num_devices) -> Strategy
    topologies: tuple[str, ...] = ()
    section: str | None = None  # config.<section> holds its options


def _positive_int(value, allow_zero=False):
    return not isinstance(value, bool) and isinstance(value, int) and (value >= 0 if allow_zero else value >= 1)


def _check_dpsgd(o):
    if o["form"] not in dpsgd.FORMS:
        return f"config.dpsgd.form={o['form']!r} is unknown; use one of: {', '.join(dpsgd.FORMS)}"


def _check_gossip(o):
    if not _positive_int(o["pool_size"]):
        return f"config.gossip.pool_size={o['pool_size']!r} must be a positive integer"


def _check_easgd(o):
    if isinstance(o["beta"], bool) or not isinstance(o["beta"], (int, float)) or not 0 <= o["beta"] <= 1:
        return f"config.easgd.beta={o['beta']!r} must be a number in [0, 1] (the moving rate is beta / k)"
    if not _positive_int(o["period"]):
        return f"config.easgd.period={o['period']!r} must be a positive integer (steps between exchanges)"


def _check_async_ps(o):
    if not _positive_int(o["staleness"], allow_zero=True):
        return f"config.async_ps.staleness={o['staleness']!r} must be an integer >= 0"
    if o["delay"] not in async_ps.DELAYS:
        return f"config.async_ps.delay={o['delay']!r} is unknown; use one of: {', '.join(async_ps.DELAYS)}"


# config section -> (defaults, check returning an error message or None)
SECTIONS = {
    "dpsgd": (dpsgd.OPTIONS, _check_dpsgd),
    "gossip": (gossip.OPTIONS, _check_gossip),
    "easgd": (easgd.OPTIONS, _check_easgd),
    "async_ps": (async_ps.OPTIONS, _check_async_ps),
}


def options(config, section: str) -> dict:
    """config.<section> as a dict, missing keys filled from the strategy module's defaults."""
    value = config.get(section)
    return {**SECTIONS[section][0], **(dict(value) if value is not None else {})}


def _gossip(cls):
    def build(config, num_devices: int) -> Strategy:
        return cls(
            topology=topology_of(config),
            pool_size=int(options(config, "gossip")["pool_size"]),
            seed=int(config.seed),
            num_devices=num_devices,
            num_workers=config.num_workers,
        )

    return build


REGISTRY: dict[str, Entry] = {
    "allreduce": Entry(lambda c, d: Allreduce(aggregation=c.aggregation, bucket_mb=float(c.bucket_mb))),
    "dpsgd": Entry(
        lambda c, d: DPSGD(
            topology=topology_of(c), form=options(c, "dpsgd")["form"], num_devices=d, num_workers=c.num_workers
        ),
        dpsgd.TOPOLOGIES,
        "dpsgd",
    ),
    "gossip_pull": Entry(_gossip(GossipPull), gossip.PULL_TOPOLOGIES, "gossip"),
    "gossip_push": Entry(_gossip(GossipPush), gossip.PUSH_TOPOLOGIES, "gossip"),
    "easgd": Entry(
        lambda c, d: EASGD(num_workers=c.num_workers, **{k: v for k, v in options(c, "easgd").items()}),
        section="easgd",
    ),
    "async_ps": Entry(
        lambda c, d: AsyncPS(seed=int(c.seed), num_workers=c.num_workers, **options(c, "async_ps")),
        section="async_ps",
    ),
}
STRATEGIES = tuple(REGISTRY)


def topology_of(config) -> str:
    """``config.topology``, or the strategy's default topology when it is '' ('' when it has none)."""
    topologies = REGISTRY[config.strategy].topologies
    return config.get("topology", "") or (topologies[0] if topologies else "")


def from_config(config, num_devices: int) -> Strategy:
    """The strategy named by ``config.strategy`` for k = ``config.num_workers`` workers on d devices."""
    return REGISTRY[config.strategy].build(config, num_devices)


def check_config(config) -> None:
    """Raise ValueError (one line: what is wrong and how to fix it) for bad strategy settings."""
    name = config.get("strategy")
    if name not in REGISTRY:
        raise ValueError(f"config.strategy={name!r} is unknown; use one of: {', '.join(STRATEGIES)}")
    entry = REGISTRY[name]
    topology = config.get("topology", "")
    if topology and not entry.topologies:
        with_topology = [s for s, e in REGISTRY.items() if e.topologies]
        raise ValueError(
            f"config.topology={topology!r} does not apply to strategy {name!r} (it has no topology); "
            f"drop --config.topology or use --config.strategy={' | '.join(with_topology)}"
        )
    if topology and topology not in entry.topologies:
        raise ValueError(
            f"config.topology={topology!r} is unknown for strategy {name!r}; use one of: {', '.join(entry.topologies)}"
        )
    if entry.topologies:
        topology = topology or entry.topologies[0]
        k, need = config.num_workers, mixing.MIN_WORKERS[topology]
        if isinstance(k, int) and k < need:
            raise ValueError(
                f"topology {topology!r} needs at least {need} workers but config.num_workers={k}; "
                f"raise --config.num_workers or choose another --config.topology"
            )
    if name != "allreduce" and config.get("aggregation", "psum") != "psum":
        raise ValueError(
            f"config.aggregation={config.aggregation!r} applies to strategy 'allreduce' only; "
            f"drop --config.aggregation for strategy {name!r}"
        )
    for section, (defaults, check) in SECTIONS.items():
        given = options(config, section)
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"config.{section}.{unknown[0]} is unknown; fields: {', '.join(defaults)}")
        if section != entry.section:
            changed = [key for key, value in given.items() if value != defaults[key]]
            if changed:
                users = [s for s, e in REGISTRY.items() if e.section == section]
                raise ValueError(
                    f"config.{section}.{changed[0]} is an option of strategy {' / '.join(users)}, not of "
                    f"{name!r}; drop it or set --config.strategy={users[0]}"
                )
        problem = check(given)
        if problem:
            raise ValueError(problem)
