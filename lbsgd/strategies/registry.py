"""The strategy registry: a strategy registers itself, and everything else is derived from it.

A strategy is one module::

    @dataclasses.dataclass(frozen=True)
    class MyOptions(registry.Options):
        period: int = 4                      # config.my_section.period, default 4

        def validate(self):
            if not registry.is_count(self.period):
                return f"config.my_section.period={self.period!r} must be a positive integer"

    @registry.register("my_strategy", MyOptions, section="my_section", compare={"my H=4": ()})
    @dataclasses.dataclass(frozen=True)
    class MyStrategy(Strategy):
        ...

From the registrations come the config sections and their defaults (``sections``, read by
``lbsgd.config.schema``), the checks of ``config.strategy``, ``config.topology`` and every option
(``check_config``, called by ``lbsgd.config.validate``), the strategy object of a run (``build``) and the
settings ``lbsgd.compare`` runs (``compare_entries``). Nothing else names a strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lbsgd.errors import ConfigError
from lbsgd.parallel import mixing


@dataclasses.dataclass(frozen=True)
class Options:
    """A strategy's options (``config.<section>``): dataclass fields with their defaults.

    Subclasses add fields and override ``validate``; an instance holds the values of one run."""

    def validate(self) -> str | None:
        """One line saying what is wrong with a value and how to fix it, or None when all are valid."""
        return None

    def validate_for(self, config) -> str | None:
        """Like ``validate``, for checks that need the rest of the run's config (k, the epochs); called for
        the chosen strategy's options only. None by default."""
        return None


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered strategy: its class, options, config section, topologies and comparison settings."""

    name: str
    cls: type
    options: type[Options] = Options
    section: str | None = None  # config.<section> holds the options
    topologies: tuple[str, ...] = ()  # accepted values of config.topology; the first is the default
    compare: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (label, --config overrides) for lbsgd.compare


REGISTRY: dict[str, Entry] = {}


def register(
    name: str,
    options: type[Options] = Options,
    *,
    section: str | None = None,
    topologies: tuple[str, ...] = (),
    compare: dict[str, tuple[str, ...]] | None = None,
) -> Callable[[type], type]:
    """Class decorator: register a ``Strategy`` subclass as ``config.strategy=name``.

    ``options``/``section``: its options dataclass and the config section that holds them (several
    strategies may share one section with the same options). ``topologies``: the values of
    ``config.topology`` it accepts (first = default). ``compare``: label -> overrides (``field=value``,
    ``{k}`` and ``{k_minus_1}`` filled in) of the settings ``lbsgd.compare`` runs; ``strategy=name`` is
    added to each. Default: one setting labelled ``name``.
    """
    if (options is Options) != (section is None):
        raise TypeError(f"strategy {name!r}: give both an Options subclass and its config section, or neither")
    for other in REGISTRY.values():
        if section is not None and other.section == section and other.options is not options:
            raise TypeError(f"strategy {name!r}: section {section!r} already holds {other.name!r}'s options")

    def decorate(cls: type) -> type:
        cls.name = name
        settings = compare if compare is not None else {name: ()}
        entries = tuple((label, (f"strategy={name}", *overrides)) for label, overrides in settings.items())
        REGISTRY[name] = Entry(name, cls, options, section, tuple(topologies), entries)
        return cls

    return decorate


def names() -> tuple[str, ...]:
    """Every registered strategy, in registration order."""
    return tuple(REGISTRY)


def sections() -> dict[str, dict[str, Any]]:
    """Config section -> its options' defaults, for every registered strategy with options."""
    out = {}
    for entry in REGISTRY.values():
        if entry.section is not None:
            out[entry.section] = {f.name: f.default for f in dataclasses.fields(entry.options)}
    return out


def options(config, name: str | None = None) -> Options:
    """The options of strategy ``name`` (default ``config.strategy``) from its config section."""
    entry = REGISTRY[name or config.strategy]
    if entry.section is None:
        return entry.options()
    value = config.get(entry.section)
    return entry.options(**(dict(value) if value is not None else {}))


def topology_of(config) -> str:
    """``config.topology``, or the strategy's default topology when it is '' ('' when it has none)."""
    topologies = REGISTRY[config.strategy].topologies
    return config.topology or (topologies[0] if topologies else "")


def build(config, num_devices: int):
    """The strategy named by ``config.strategy`` for k = ``config.num_workers`` workers on d devices."""
    entry = REGISTRY[config.strategy]
    return entry.cls.from_config(config, options(config), num_devices)


def compare_entries() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every registered comparison setting: (label, overrides), in registration order."""
    return tuple(item for entry in REGISTRY.values() for item in entry.compare)


def is_count(value, allow_zero: bool = False) -> bool:
    """An int (not a bool) >= 1, or >= 0 with ``allow_zero``."""
    return not isinstance(value, bool) and isinstance(value, int) and (value >= 0 if allow_zero else value >= 1)


def is_number_in(value, low: float, high: float) -> bool:
    """An int or float (not a bool) in [low, high]."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= high


def _check_topology(config, entry: Entry) -> None:
    topology = config.topology
    if topology and not entry.topologies:
        with_topology = [s for s, e in REGISTRY.items() if e.topologies]
        raise ConfigError(
            f"config.topology={topology!r} does not apply to strategy {entry.name!r} (it has no topology); "
            f"drop --config.topology or use --config.strategy={' | '.join(with_topology)}"
        )
    if topology and topology not in entry.topologies:
        raise ConfigError(
            f"config.topology={topology!r} is unknown for strategy {entry.name!r}; use one of: "
            f"{', '.join(entry.topologies)}"
        )
    if entry.topologies:
        topology = topology or entry.topologies[0]
        k, need = config.num_workers, mixing.MIN_WORKERS[topology]
        if isinstance(k, int) and k < need:
            raise ConfigError(
                f"topology {topology!r} needs at least {need} workers but config.num_workers={k}; "
                f"raise --config.num_workers or choose another --config.topology"
            )


def _check_sections(config, entry: Entry) -> None:
    for section, defaults in sections().items():
        value = config.get(section)
        given = {**defaults, **(dict(value) if value is not None else {})}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ConfigError(f"config.{section}.{unknown[0]} is unknown; fields: {', '.join(defaults)}")
        if section != entry.section:
            changed = [key for key, v in given.items() if v != defaults[key]]
            if changed:
                users = [s for s, e in REGISTRY.items() if e.section == section]
                raise ConfigError(
                    f"config.{section}.{changed[0]} is an option of strategy {' / '.join(users)}, not of "
                    f"{entry.name!r}; drop it or set --config.strategy={users[0]}"
                )
        owner = next(e for e in REGISTRY.values() if e.section == section)
        chosen = owner.options(**given)
        problem = chosen.validate() or (chosen.validate_for(config) if section == entry.section else None)
        if problem:
            raise ConfigError(problem)


def check_config(config) -> None:
    """Raise ``ConfigError`` (one line: what is wrong and how to fix it) for bad strategy settings:
    unknown strategies and topologies, topologies that need more workers than k, an aggregation for a
    strategy that does not aggregate, unknown or bad option values, and options of another strategy."""
    name = config.strategy
    if name not in REGISTRY:
        raise ConfigError(f"config.strategy={name!r} is unknown; use one of: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    _check_topology(config, entry)
    if not entry.cls.uses_aggregation and config.aggregation != "psum":
        users = [s for s, e in REGISTRY.items() if e.cls.uses_aggregation]
        raise ConfigError(
            f"config.aggregation={config.aggregation!r} applies to strategy {' / '.join(repr(u) for u in users)} only; "
            f"drop --config.aggregation for strategy {name!r}"
        )
    _check_sections(config, entry)
