"""Micro-benchmarks: ``python -m lbsgd.bench <subcommand> [flags]``.

Subcommands are looked up in ``SUBCOMMANDS`` (name -> callable taking the
remaining argv and returning an exit status, or a lazy ``"module:function"``
string imported only when that subcommand runs, so that e.g. XLA flags can be
set before JAX is imported). To add one, add an entry here, e.g.
``"input": "lbsgd.data.bench:main"``, or call ``register`` at runtime.

``allreduce``: times the allreduce algorithms of
``lbsgd.parallel.aggregators`` (Goyal et al. 2017, §4) against ``lax.psum``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Sequence, Union

from lbsgd import cli

Command = Callable[[Sequence[str]], int]

# name -> command; filled in below, after the commands are defined.
SUBCOMMANDS: dict[str, Union[Command, str]] = {}


def register(name: str, target: Union[Command, str]) -> None:
    """Add a subcommand: a callable ``f(argv) -> int`` or ``"module:func"``."""
    SUBCOMMANDS[name] = target


def _resolve(target: Union[Command, str]) -> Command:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------
# allreduce
# --------------------------------------------------------------------------

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
DEFAULT_SIZES = "1KB,64KB,1MB,16MB,100MB"
DEFAULT_DEVICES = "2,4,8"


def parse_size(text: str) -> int:
    """'64KB' -> 65536 bytes; K/KB, M/MB, G/GB are 2**10, 2**20, 2**30."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 64KB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n < 4:
        raise argparse.ArgumentTypeError(f"size {text!r} is below one float32")
    return n


def _csv(conv):
    def parse(text):
        items = [conv(t) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items

    return parse


def _device_count(text: str) -> int:
    p = int(text)
    if p < 1:
        raise argparse.ArgumentTypeError(f"device count must be >= 1: {p}")
    return p


def _fmt_size(n: int) -> str:
    for unit, k in (("GB", 30), ("MB", 20), ("KB", 10)):
        if n >= 1 << k and n % (1 << k) == 0:
            return f"{n >> k}{unit}"
    return f"{n}B"


def default_repeats(nbytes: int) -> int:
    """Fewer repeats for large buffers, so the default grid stays quick."""
    if nbytes <= 1 << 20:
        return 20
    if nbytes <= 16 << 20:
        return 5
    return 3


def _ensure_host_devices(count: int = 8) -> None:
    """Ask XLA for ``count`` CPU devices, if JAX is not yet imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def allreduce_main(argv: Sequence[str]) -> int:
    """``python -m lbsgd.bench allreduce``: ring / halving_doubling vs psum."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench allreduce",
        description="Time allreduce algorithms (Goyal et al. §4) against lax.psum on the first p devices.",
    )
    ap.add_argument(
        "--sizes",
        type=_csv(parse_size),
        default=_csv(parse_size)(DEFAULT_SIZES),
        help=f"per-device buffer sizes (default {DEFAULT_SIZES})",
    )
    ap.add_argument(
        "--devices",
        type=_csv(_device_count),
        default=_csv(_device_count)(DEFAULT_DEVICES),
        help=f"worker counts p (default {DEFAULT_DEVICES})",
    )
    ap.add_argument("--methods", type=_csv(str), default=None, help="algorithms (default: all of AGGREGATIONS)")
    ap.add_argument(
        "--repeats",
        type=_device_count,
        default=None,
        help="timed calls per point (default: 20 up to 1MB, 5 up to 16MB, 3 above)",
    )
    ap.add_argument("--json", default=None, help="write results to this path")
    args = ap.parse_args(argv)

    _ensure_host_devices(8)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from lbsgd.parallel import aggregators as agg

    methods = args.methods or list(agg.AGGREGATIONS)
    bad = [m for m in methods if m not in agg.AGGREGATIONS]
    if bad:
        ap.error(f"unknown --methods {','.join(bad)}; valid: {','.join(agg.AGGREGATIONS)}")
    if "psum" not in methods:
        methods = ["psum"] + methods  # the baseline for the ratios
    devices = jax.devices()
    kind = f"{devices[0].platform}: {devices[0].device_kind}"
    print(f"device kind: {kind}; {len(devices)} devices; host cores: {os.cpu_count()}; jax {jax.__version__}")

    results = []
    for p in args.devices:
        if p > len(devices):
            print(f"skipping p={p}: only {len(devices)} devices")
            continue
        mesh = Mesh(np.array(devices[:p]), ("w",))
        sharding = NamedSharding(mesh, P("w"))
        for nbytes in args.sizes:
            n = nbytes // 4
            # Worker r holds r+1 everywhere: every sum is exactly p(p+1)/2.
            x = jax.make_array_from_callback(
                (p * n,), sharding, lambda idx: np.full(n, (idx[0].start or 0) // n + 1, np.float32)
            )
            jax.block_until_ready(x)
            expected = p * (p + 1) / 2
            repeats = args.repeats or default_repeats(nbytes)
            base = None
            for method in methods:
                fn = agg.FLAT_ALGORITHMS[method]
                f = jax.jit(jax.shard_map(lambda v, fn=fn: fn(v, "w"), mesh=mesh, in_specs=P("w"), out_specs=P("w")))
                t0 = time.perf_counter()
                y = jax.block_until_ready(f(x))  # compile + warm-up
                compile_s = time.perf_counter() - t0
                ok = bool(jnp.all(y == expected))
                del y
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(x))
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                if method == "psum":
                    base = med
                row = dict(
                    method=method,
                    p=p,
                    bytes=nbytes,
                    repeats=repeats,
                    median_s=med,
                    min_s=min(times),
                    compile_s=compile_s,
                    ratio_to_psum=med / base,
                    correct=ok,
                    device_kind=kind,
                )
                results.append(row)
                print(
                    f"p={p} size={_fmt_size(nbytes):>6} {method:<16} "
                    f"median {med * 1e3:9.3f} ms  x{med / base:5.2f} psum"
                    f"{'' if ok else '  WRONG RESULT'}",
                    flush=True,
                )
            del x

    print()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device_kind=kind, results=results), fh, indent=1)
        print(f"wrote {args.json}")
    return 0 if all(r["correct"] for r in results) else 1


def format_table(results: Sequence[dict]) -> str:
    """Markdown table: one row per (p, size), median ms and ratio to psum."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    keys = list(dict.fromkeys((r["p"], r["bytes"]) for r in results))
    cell = {(r["p"], r["bytes"], r["method"]): r for r in results}
    head = ["p", "size"] + [f"{m} ms" for m in methods] + [f"{m}/psum" for m in methods if m != "psum"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for p, b in keys:
        row = [str(p), _fmt_size(b)]
        row += [f"{cell[p, b, m]['median_s'] * 1e3:.3f}" if (p, b, m) in cell else "" for m in methods]
        row += [f"{cell[p, b, m]['ratio_to_psum']:.2f}" if (p, b, m) in cell else "" for m in methods if m != "psum"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


SUBCOMMANDS.update(
    {
        "allreduce": allreduce_main,
        "input": "lbsgd.bench_imagenet:input_main",
        "step": "lbsgd.bench_imagenet:step_main",
        "workers": "lbsgd.bench_workers:main",
        # Others add lazy entries here, e.g. "name": "module:function".
    }
)


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``python -m lbsgd.bench <subcommand> [flags]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    valid = ", ".join(sorted(SUBCOMMANDS))
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m lbsgd.bench <subcommand> [flags]\nsubcommands: {valid}")
        return 0
    if not argv:
        sys.stderr.write(f"python -m lbsgd.bench: error: missing subcommand; valid: {valid}\n")
        return 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"python -m lbsgd.bench: error: unknown subcommand {name!r}; valid: {valid}\n")
        return 2
    return int(_resolve(SUBCOMMANDS[name])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
