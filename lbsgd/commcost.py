"""``python -m lbsgd.commcost``: ring vs halving/doubling allreduce under the alpha-beta-gamma model.

Prints a table over the worker count p and writes a plot. The formulas (Goyal et al. 2017, §4; Thakur,
Rabenseifner & Gropp 2005) live in ``lbsgd.costmodel`` and are re-exported here.
Sizes: 1 MB here means 1 MiB = 2**20 bytes; bandwidth is in Gbit/s = 1e9 bit/s.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

from lbsgd import cli
from lbsgd.costmodel import (  # noqa: F401 - re-exported: the formulas of this tool
    MIB,
    DEFAULT_MESSAGE_MB,
    DEFAULT_BANDWIDTH_GBIT,
    DEFAULT_LATENCY_US,
    DEFAULT_REDUCE_GBYTE_S,
    NETWORKS,
    COSTS,
    message_time,
    is_power_of_two,
    ring_cost,
    halving_doubling_cost,
    model_params,
    hd_advantage,
    crossover,
    crossover_bytes,
)


def default_p_values(max_p: int) -> list[int]:
    """Powers of two 2..max_p plus some non-powers (3, 6, 12, 24, 100, ...)."""
    pows = [1 << k for k in range(1, max_p.bit_length()) if 1 << k <= max_p]
    others = [3, 6, 12, 24, 48, 100, 384, 1000, 1536, 2000, 3000]
    return sorted(set(pows + [p for p in others if p <= max_p]))


def _winner(ring_s: float, hd_s: float) -> str:
    if hd_s < ring_s:
        return "halving_doubling"
    return "ring" if ring_s < hd_s else "tie"


def table(p_values: Sequence[int], nbytes: float, alpha: float, beta: float, gamma: float) -> list[dict]:
    """Rows of ring vs halving/doubling cost (steps, bytes, time, winner) for each p."""
    rows = []
    for p in p_values:
        r = ring_cost(p, nbytes, alpha, beta, gamma)
        h = halving_doubling_cost(p, nbytes, alpha, beta, gamma)
        rows.append(
            dict(
                p=p,
                ring_steps=r["steps"],
                hd_steps=h["steps"],
                ring_ms=1e3 * r["time_s"],
                hd_ms=1e3 * h["time_s"],
                winner=_winner(r["time_s"], h["time_s"]),
            )
        )
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Render ``table()`` rows as the fixed-width text table the CLI prints."""
    head = f"{'p':>6} {'ring steps':>10} {'h/d steps':>9} {'ring ms':>10} {'h/d ms':>10} {'ring/hd':>8}  winner"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['p']:>6} {r['ring_steps']:>10} {r['hd_steps']:>9} "
            f"{r['ring_ms']:>10.3f} {r['hd_ms']:>10.3f} "
            f"{r['ring_ms'] / r['hd_ms']:>8.2f}  {r['winner']}"
        )
    return "\n".join(lines)


def plot(path: str, max_p: int, nbytes: float, alpha: float, beta: float, gamma: float, fixed_p: int) -> None:
    """Write a PNG: time vs p (left) and time vs message size at fixed p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ps = list(range(2, max_p + 1))
    pow2 = [p for p in ps if is_power_of_two(p)]
    other = [p for p in ps if not is_power_of_two(p)]

    def ms(fn, pp):
        return [1e3 * fn(p, nbytes, alpha, beta, gamma)["time_s"] for p in pp]

    ax1.plot(ps, ms(ring_cost, ps), label="ring", lw=1.5)
    ax1.plot(pow2, ms(halving_doubling_cost, pow2), marker="o", label="halving_doubling, p = 2^k")
    ax1.plot(other, ms(halving_doubling_cost, other), ls="--", lw=1, label="halving_doubling, other p (pre/post step)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("workers p")
    ax1.set_ylabel("allreduce time (ms)")
    ax1.set_title(f"message {nbytes / MIB:g} MiB")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)

    sizes = [2.0**k for k in range(10, 31)]  # 1 KiB .. 1 GiB
    for name, fn in COSTS.items():
        ax2.plot(
            [b / MIB for b in sizes],
            [1e3 * fn(fixed_p, b, alpha, beta, gamma)["time_s"] for b in sizes],
            label=name,
            marker=".",
        )
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("message size (MiB)")
    ax2.set_ylabel("allreduce time (ms)")
    ax2.set_title(f"p = {fixed_p}")
    ax2.legend()
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"alpha-beta-gamma model: alpha={alpha * 1e6:g} us, "
        f"{8 / beta / 1e9:g} Gbit/s, "
        f"reduce {'inf' if gamma == 0 else f'{1 / gamma / 1e9:g}'} "
        "GB/s (Goyal et al. 2017, sec. 4)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXAMPLES = (
    "python -m lbsgd.commcost --out=/tmp/commcost.png",
    "python -m lbsgd.commcost --bandwidth_gbit=10 --latency_us=50 --max_p=1024 --out=/tmp/commcost_10gbe.png",
    "python -m lbsgd.commcost --message_mb=25 --fixed_p=256 --reduce_gbyte_s=0 --out=/tmp",
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``lbsgd.commcost``."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.commcost",
        description="alpha-beta-gamma model: ring vs recursive halving/doubling allreduce (Goyal et al. §4).",
        examples=EXAMPLES,
    )
    ap.add_argument(
        "--message_mb",
        type=cli.positive(float),
        default=DEFAULT_MESSAGE_MB,
        help="message size in MiB; 100 = ResNet-50's ~25.6M float32 gradients",
    )
    ap.add_argument(
        "--bandwidth_gbit",
        type=cli.positive(float),
        default=DEFAULT_BANDWIDTH_GBIT,
        help="link bandwidth in Gbit/s; 50 = Goyal's Ethernet",
    )
    ap.add_argument("--latency_us", type=float, default=DEFAULT_LATENCY_US, help="per-message latency alpha in us")
    ap.add_argument(
        "--reduce_gbyte_s",
        type=float,
        default=DEFAULT_REDUCE_GBYTE_S,
        help="reduction throughput in GB/s, gamma = 1/this; 0 = free",
    )
    ap.add_argument("--max_p", type=cli.positive(int), default=4096, help="largest worker count p")
    ap.add_argument("--fixed_p", type=cli.positive(int), default=1000, help="p for the time-vs-message-size panel")
    ap.add_argument("--out", default="commcost.png", help="PNG path; a directory means <dir>/commcost.png")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lbsgd.commcost``: print the table, write the PNG; returns the exit status."""
    ap = make_parser()
    args = ap.parse_args(argv)
    if args.latency_us < 0:
        ap.error("--latency_us must be >= 0")
    if args.reduce_gbyte_s < 0:
        ap.error("--reduce_gbyte_s must be >= 0")
    if args.max_p < 2:
        ap.error("--max_p must be >= 2")

    alpha, beta, gamma = model_params(args.bandwidth_gbit, args.latency_us, args.reduce_gbyte_s)
    nbytes = args.message_mb * MIB
    ps = default_p_values(args.max_p)
    print(
        f"alpha-beta-gamma model: message {args.message_mb:g} MiB, "
        f"{args.bandwidth_gbit:g} Gbit/s, alpha {args.latency_us:g} us, "
        f"reduce {args.reduce_gbyte_s:g} GB/s"
    )
    print(format_table(table(ps, nbytes, alpha, beta, gamma)))
    all_ps = range(2, args.max_p + 1)
    cp = crossover(all_ps, nbytes, alpha, beta, gamma)
    print("halving/doubling beats ring at every power of two p >= 4 (same bytes, fewer steps).")
    print(
        "including non-powers of two (pre/post step costs ~2b beta): "
        + (f"halving/doubling wins for all p >= {cp}" if cp else f"ring still wins at some p up to {args.max_p}")
    )
    b_star = crossover_bytes(args.fixed_p, alpha, beta, gamma)
    print(
        f"at p = {args.fixed_p}: halving/doubling wins for messages "
        + ("of any size" if math.isinf(b_star) else f"below {b_star / MIB:.3g} MiB")
    )

    out = args.out
    if os.path.isdir(out):
        out = os.path.join(out, "commcost.png")
    try:
        plot(out, args.max_p, nbytes, alpha, beta, gamma, args.fixed_p)
    except OSError as e:
        print(f"python -m lbsgd.commcost: error: cannot write {out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
