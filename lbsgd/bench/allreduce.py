"""``python -m lbsgd.bench allreduce``: the allreduce algorithms of ``lbsgd.parallel.aggregators``
(Goyal et al. 2017, §4: ring, recursive halving/doubling) against ``lax.psum``, on the first p devices.

Each point: compile (timed apart), one checked call (every worker holds r+1, so every sum must be
exactly p(p+1)/2), then ``--repeats`` timed calls; median and spread, and the ratio to psum's median.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Sequence

import numpy as np

from lbsgd import cli
from lbsgd.bench import common

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


def format_size(n: int) -> str:
    """65536 -> '64KB': the largest binary unit that divides ``n`` exactly, else bytes."""
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


EXAMPLES = (
    "python -m lbsgd.bench allreduce --sizes=64KB,1MB --devices=8 --repeats=5",
    "python -m lbsgd.bench allreduce --methods=ring --json=allreduce.json",
    "python -m lbsgd.bench allreduce --sizes=1MB,16MB,100MB --devices=2,4,8 --methods=ring,halving_doubling",
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``bench allreduce``."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench allreduce",
        description="Time allreduce algorithms (Goyal et al. §4) against lax.psum on the first p devices.",
        examples=EXAMPLES,
    )
    ap.add_argument(
        "--sizes",
        type=_csv(parse_size),
        default=_csv(parse_size)(DEFAULT_SIZES),
        help=f"per-device buffer sizes, comma-separated (default: {DEFAULT_SIZES})",
    )
    ap.add_argument(
        "--devices",
        type=_csv(_device_count),
        default=_csv(_device_count)(DEFAULT_DEVICES),
        help=f"worker counts p, comma-separated (default: {DEFAULT_DEVICES})",
    )
    ap.add_argument(
        "--methods",
        type=_csv(str),
        default=None,
        help="algorithms, comma-separated (default: every one: psum, ring, halving_doubling)",
    )
    ap.add_argument(
        "--repeats",
        type=_device_count,
        default=None,
        help="timed calls per point (default: 20 up to 1MB, 5 up to 16MB, 3 above)",
    )
    ap.add_argument("--json", default=None, help="write results to this path")
    return ap


def time_point(devices: Sequence, nbytes: int, methods: Sequence[str], repeats: int, kind: str) -> list[dict]:
    """Time every method on p = len(``devices``) workers of ``nbytes`` each; one row per method (psum first).

    Worker r holds r+1 everywhere, so every sum must be exactly p(p+1)/2 (``correct``); the warm-up call
    is the checked one, then ``repeats`` timed calls. Prints one line per method as it goes.
    """
    # Imported here, not at module level: JAX must start after ensure_host_devices has set XLA_FLAGS.
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from lbsgd.parallel import aggregators as agg

    p, n = len(devices), nbytes // 4
    mesh = Mesh(np.array(devices), ("w",))
    sharding = NamedSharding(mesh, P("w"))
    # Worker r holds r+1 everywhere: every sum is exactly p(p+1)/2.
    x = jax.make_array_from_callback(
        (p * n,), sharding, lambda idx: np.full(n, (idx[0].start or 0) // n + 1, np.float32)
    )
    jax.block_until_ready(x)
    expected = p * (p + 1) / 2
    rows, base = [], None
    for method in methods:
        fn = agg.FLAT_ALGORITHMS[method]
        f = jax.jit(jax.shard_map(lambda v, fn=fn: fn(v, "w"), mesh=mesh, in_specs=P("w"), out_specs=P("w")))
        compiled, compile_s = common.compile_timed(f, x)
        y = jax.block_until_ready(compiled(x))  # the warm-up call, checked
        ok = bool(jnp.all(y == expected))
        del y
        stats = common.summarize(
            common.time_calls(lambda c=compiled, v=x: jax.block_until_ready(c(v)), repeats=repeats, warmup=0)
        )
        med = stats["median_s"]
        if method == "psum":
            base = med
        rows.append(
            dict(
                method=method,
                p=p,
                bytes=nbytes,
                **stats,
                compile_s=compile_s,
                ratio_to_psum=med / base,
                correct=ok,
                device_kind=kind,
            )
        )
        print(
            f"p={p} size={format_size(nbytes):>6} {method:<16} "
            f"median {med * 1e3:9.3f} ms (min {stats['min_s'] * 1e3:.3f}, max {stats['max_s'] * 1e3:.3f})"
            f"  x{med / base:5.2f} psum{'' if ok else '  WRONG RESULT'}",
            flush=True,
        )
    del x
    return rows


def main(argv: Sequence[str]) -> int:
    """``python -m lbsgd.bench allreduce``: ring / halving_doubling vs psum; 0 if every sum was exact, else 1."""
    ap = make_parser()
    args = ap.parse_args(argv)
    common.ensure_host_devices(8)
    # Imported here, not at module level: JAX must start after ensure_host_devices has set XLA_FLAGS.
    import jax

    from lbsgd.parallel import aggregators as agg

    methods = args.methods or list(agg.AGGREGATIONS)
    bad = [m for m in methods if m not in agg.AGGREGATIONS]
    if bad:
        ap.error(f"unknown --methods {','.join(bad)}; valid: {','.join(agg.AGGREGATIONS)}")
    if "psum" not in methods:
        methods = ["psum"] + methods  # the baseline for the ratios
    devices = jax.devices()
    kind = common.device_kind(devices[0])
    print(f"device kind: {kind}; {len(devices)} devices; host cores: {os.cpu_count()}; jax {jax.__version__}")

    results = []
    for p in args.devices:
        if p > len(devices):
            print(f"skipping p={p}: only {len(devices)} devices")
            continue
        for nbytes in args.sizes:
            results += time_point(devices[:p], nbytes, methods, args.repeats or default_repeats(nbytes), kind)

    print()
    print(format_table(results))
    common.write_json(args.json, dict(device_kind=kind, results=results))
    return 0 if all(r["correct"] for r in results) else 1


def format_table(results: Sequence[dict]) -> str:
    """Markdown table: one row per (p, size), median ms and ratio to psum."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    keys = list(dict.fromkeys((r["p"], r["bytes"]) for r in results))
    cell = {(r["p"], r["bytes"], r["method"]): r for r in results}
    head = ["p", "size"] + [f"{m} ms" for m in methods] + [f"{m}/psum" for m in methods if m != "psum"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for p, b in keys:
        row = [str(p), format_size(b)]
        row += [f"{cell[p, b, m]['median_s'] * 1e3:.3f}" if (p, b, m) in cell else "" for m in methods]
        row += [f"{cell[p, b, m]['ratio_to_psum']:.2f}" if (p, b, m) in cell else "" for m in methods if m != "psum"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
