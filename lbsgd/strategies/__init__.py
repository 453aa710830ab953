"""Strategies: how k workers combine (GUIDE §6). One module each, one registry line each.

=============  ==========================================================  ===========================
name           what the workers share                                      module
=============  ==========================================================  ===========================
allreduce      one copy; gradients summed over all k (Goyal et al.)        ``allreduce.py``
dpsgd          nothing; neighbour averaging on a topology (Lian et al.)    ``dpsgd.py``
gossip_pull    nothing; average with one random peer (Jin et al.)          ``gossip.py``
gossip_push    nothing; push-sum with one peer (Jin et al.; Assran et al.) ``gossip.py``
=============  ==========================================================  ===========================

``from_config(config, num_devices)`` builds the one named by ``config.strategy``;
``check_config(config)`` rejects, in one line each, unknown strategies and topologies, topologies
that need more workers than k, and options that belong to another strategy.
"""

from __future__ import annotations

from typing import Callable

from lbsgd.parallel import mixing
from lbsgd.strategies import allreduce, dpsgd, gossip
from lbsgd.strategies.allreduce import Allreduce
from lbsgd.strategies.base import StepContext, Strategy
from lbsgd.strategies.dpsgd import DPSGD
from lbsgd.strategies.gossip import GossipPull, GossipPush

__all__ = [
    "DPSGD",
    "Allreduce",
    "GossipPull",
    "GossipPush",
    "REGISTRY", "STRATEGIES", "StepContext", "Strategy", "check_config", "from_config", "topology_of"]


def _allreduce(config, num_devices: int) -> Strategy:
    return allreduce.Allreduce(aggregation=config.aggregation, bucket_mb=float(config.bucket_mb))


def _dpsgd(config, num_devices: int) -> Strategy:
    return dpsgd.DPSGD(
        topology=topology_of(config),
        form=_section(config, "dpsgd")["form"],
        num_devices=num_devices,
        num_workers=config.num_workers,
    )


def _gossip(cls):
    def build(config, num_devices: int) -> Strategy:
        return cls(
            topology=topology_of(config),
            pool_size=int(_section(config, "gossip")["pool_size"]),
            seed=int(config.seed),
            num_devices=num_devices,
            num_workers=config.num_workers,
        )

    return build


# name -> (builder, accepted topologies (first = default), config section of its options, defaults)
REGISTRY: dict[str, tuple[Callable, tuple[str, ...], str | None, dict]] = {
    "allreduce": (_allreduce, (), None, {}),
    "dpsgd": (_dpsgd, dpsgd.TOPOLOGIES, "dpsgd", dpsgd.OPTIONS),
    "gossip_pull": (_gossip(gossip.GossipPull), gossip.PULL_TOPOLOGIES, "gossip", gossip.OPTIONS),
    "gossip_push": (_gossip(gossip.GossipPush), gossip.PUSH_TOPOLOGIES, "gossip", gossip.OPTIONS),
}
STRATEGIES = tuple(REGISTRY)
SECTIONS = {section: defaults for _, _, section, defaults in REGISTRY.values() if section}


def _section(config, name: str) -> dict:
    """config.<name> as a dict, missing keys filled from the strategy's defaults."""
    value = config.get(name)
    return {**SECTIONS[name], **(dict(value) if value is not None else {})}


def topology_of(config) -> str:
    """``config.topology``, or the strategy's default topology when it is '' ('' for allreduce)."""
    topologies = REGISTRY[config.strategy][1]
    return config.get("topology", "") or (topologies[0] if topologies else "")


def from_config(config, num_devices: int) -> Strategy:
    """The strategy named by ``config.strategy`` for k = ``config.num_workers`` workers on d devices."""
    return REGISTRY[config.strategy][0](config, num_devices)


def check_config(config) -> None:
    """Raise ValueError (one line: what is wrong and how to fix it) for bad strategy settings."""
    name = config.get("strategy")
    if name not in REGISTRY:
        raise ValueError(f"config.strategy={name!r} is unknown; use one of: {', '.join(STRATEGIES)}")
    _, topologies, section, _ = REGISTRY[name]
    topology = config.get("topology", "")
    if topology and not topologies:
        raise ValueError(
            f"config.topology={topology!r} does not apply to strategy {name!r} (it has no topology); "
            f"drop --config.topology or use --config.strategy=dpsgd"
        )
    if topology and topology not in topologies:
        raise ValueError(
            f"config.topology={topology!r} is unknown for strategy {name!r}; use one of: {', '.join(topologies)}"
        )
    if topologies:
        topology = topology or topologies[0]
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
    for other, defaults in SECTIONS.items():
        given = _section(config, other)
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"config.{other}.{unknown[0]} is unknown; fields: {', '.join(defaults)}")
        if other != section:
            changed = [key for key, value in given.items() if value != defaults[key]]
            if changed:
                users = [s for s, (_, _, sec, _) in REGISTRY.items() if sec == other]
                raise ValueError(
                    f"config.{other}.{changed[0]} is an option of strategy {' / '.join(users)}, not of "
                    f"{name!r}; drop it or set --config.strategy={users[0]}"
                )
    form = _section(config, "dpsgd")["form"]
    if form not in dpsgd.FORMS:
        raise ValueError(f"config.dpsgd.form={form!r} is unknown; use one of: {', '.join(dpsgd.FORMS)}")
    pool = _section(config, "gossip")["pool_size"]
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"config.gossip.pool_size={pool!r} must be a positive integer")
