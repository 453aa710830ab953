"""Alpha-beta-gamma cost model of allreduce: ring vs halving/doubling.

Goyal et al. (2017), §4 "Communication", choose recursive halving/doubling
over the ring ("bucket") algorithm for the inter-server allreduce because it
needs only 2*log2(p) rather than 2(p-1) latency-bound steps while moving the
same number of bytes. This module makes that argument quantitative with the
standard model (Thakur, Rabenseifner & Gropp 2005): sending one message of
n bytes costs ``alpha + n * beta`` and reducing n bytes costs ``n * gamma``.

For p workers and a message of b bytes (time on the critical path):

* ring:  2(p-1) steps, each sending b/p bytes per node
      T = 2(p-1) alpha + 2(p-1)/p b beta + (p-1)/p b gamma
* halving/doubling, p a power of two: 2 log2(p) steps
      T = 2 log2(p) alpha + 2(p-1)/p b beta + (p-1)/p b gamma
* halving/doubling, p not a power of two (q = largest power of two <= p;
  the pre/post step of ``lbsgd.parallel.aggregators``: the p-q extra ranks
  first send their whole buffer to a partner among the q, which adds it,
  and get the result back at the end): 2 log2(q) + 2 steps
      T = (2 log2(q) + 2) alpha + (2(q-1)/q + 2) b beta + ((q-1)/q + 1) b gamma

``python -m lbsgd.commcost`` prints a table over p and writes a plot.
Sizes: 1 MB here means 1 MiB = 2**20 bytes; bandwidth is in Gbit/s = 1e9 bit/s.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Iterable, Sequence

from lbsgd import cli

MIB = 1 << 20

# Defaults, documented in the CLI help and in README:
DEFAULT_MESSAGE_MB = 100.0  # ResNet-50: ~25.6M float32 gradients ~ 100 MB.
DEFAULT_BANDWIDTH_GBIT = 50.0  # Goyal et al.'s 50 Gbit/s Ethernet.
# Per-message latency on a 50 GbE datacenter network: a few us for RDMA
# (RoCE) end to end, tens of us through the kernel TCP stack; 10 us is a
# middle value. It is a model parameter, not a measurement.
DEFAULT_LATENCY_US = 10.0
# Reduction throughput (gamma = 1 / this): ~10 GB/s, a memory-bound float32
# add on a CPU core (GPUs reduce far faster, making gamma negligible).
DEFAULT_REDUCE_GBYTE_S = 10.0


# Networks of the decentralized-SGD papers, for lbsgd.compare's time model: (Gbit/s, latency in us).
# Jin et al. 2016 train over 10 Gb Ethernet; Assran et al. 2019 compare 10 GbE with 100 Gb/s
# InfiniBand, and the FDR InfiniBand of many clusters runs at 56 Gb/s. The latencies are model
# parameters (TCP through the kernel vs RDMA), not measurements.
NETWORKS = {"10GbE": (10.0, 50.0), "IB56": (56.0, 5.0)}


def message_time(nbytes: float, alpha: float, beta: float) -> float:
    """One point-to-point message of ``nbytes``: alpha + nbytes * beta."""
    return alpha + nbytes * beta


def _check(p: int, nbytes: float) -> None:
    if int(p) != p or p < 1:
        raise ValueError(f"p must be a positive integer, got {p}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")


def is_power_of_two(p: int) -> bool:
    """True for p = 1, 2, 4, 8, ..."""
    return p >= 1 and p & (p - 1) == 0


def ring_cost(p: int, nbytes: float, alpha: float, beta: float, gamma: float) -> dict:
    """Ring allreduce cost (Goyal et al. §4's "bucket" algorithm).

    Reduce-scatter then all-gather around a ring: 2(p-1) steps, each node
    sending b/p bytes per step, so ``bytes_sent`` = 2(p-1)/p * b per node and
    (p-1)/p * b bytes reduced:
    ``time_s`` = 2(p-1) alpha + 2(p-1)/p b beta + (p-1)/p b gamma.
    Returns ``dict(steps, bytes_sent, bytes_reduced, time_s)``.
    """
    _check(p, nbytes)
    steps = 2 * (p - 1)
    sent = 2 * (p - 1) / p * nbytes
    reduced = (p - 1) / p * nbytes
    return dict(
        steps=steps, bytes_sent=sent, bytes_reduced=reduced, time_s=steps * alpha + sent * beta + reduced * gamma
    )


def halving_doubling_cost(p: int, nbytes: float, alpha: float, beta: float, gamma: float) -> dict:
    """Recursive halving/doubling allreduce cost (Goyal et al. §4).

    Power-of-two p: recursive-halving reduce-scatter (log2 p steps sending
    b/2, b/4, ... bytes) and recursive-doubling all-gather (log2 p steps):
    ``steps`` = 2 log2 p, ``bytes_sent`` = 2(p-1)/p * b per node,
    ``time_s`` = 2 log2(p) alpha + 2(p-1)/p b beta + (p-1)/p b gamma.

    Other p, with q the largest power of two <= p: one pre-step in which the
    p-q extra ranks send their whole buffer (b bytes, reduced by the
    receiver), halving/doubling on q ranks, and one post-step returning the
    result (b bytes): ``steps`` = 2 log2 q + 2, ``bytes_sent`` (critical
    path) = 2(q-1)/q b + 2b, ``time_s`` = (2 log2 q + 2) alpha
    + (2(q-1)/q + 2) b beta + ((q-1)/q + 1) b gamma.
    Returns ``dict(steps, bytes_sent, bytes_reduced, time_s)``.
    """
    _check(p, nbytes)
    q = 1 << (int(p).bit_length() - 1)
    steps = 2 * int(math.log2(q))
    sent = 2 * (q - 1) / q * nbytes
    reduced = (q - 1) / q * nbytes
    if q != p:
        steps += 2
        sent += 2 * nbytes
        reduced += nbytes
    return dict(
        steps=steps, bytes_sent=sent, bytes_reduced=reduced, time_s=steps * alpha + sent * beta + reduced * gamma
    )


COSTS: dict[str, Callable[..., dict]] = {
    "ring": ring_cost,
    "halving_doubling": halving_doubling_cost,
}


def model_params(
    bandwidth_gbit: float = DEFAULT_BANDWIDTH_GBIT,
    latency_us: float = DEFAULT_LATENCY_US,
    reduce_gbyte_s: float = DEFAULT_REDUCE_GBYTE_S,
):
    """(alpha [s], beta [s/byte], gamma [s/byte]) from network figures."""
    alpha = latency_us * 1e-6
    beta = 8.0 / (bandwidth_gbit * 1e9)
    gamma = 1.0 / (reduce_gbyte_s * 1e9) if reduce_gbyte_s > 0 else 0.0
    return alpha, beta, gamma


def hd_advantage(p: int, nbytes: float, alpha: float, beta: float, gamma: float) -> float:
    """ring time - halving/doubling time (> 0: halving/doubling wins)."""
    return (
        ring_cost(p, nbytes, alpha, beta, gamma)["time_s"]
        - halving_doubling_cost(p, nbytes, alpha, beta, gamma)["time_s"]
    )


def crossover(p_values: Iterable[int], nbytes: float, alpha: float, beta: float, gamma: float) -> int | None:
    """Smallest p in ``p_values`` from which halving/doubling beats the ring.

    Goyal et al. §4's regime: as p grows the ring's 2(p-1) alpha latency term
    dominates. Returns the smallest p such that halving/doubling is strictly
    faster at it and at every larger p in ``p_values`` (so non-powers of two,
    which pay the pre/post step, are taken into account), or None if it is
    not faster at the largest p.
    """
    ps = sorted(set(int(p) for p in p_values))
    best = None
    for p in reversed(ps):
        if hd_advantage(p, nbytes, alpha, beta, gamma) > 0:
            best = p
        else:
            break
    return best


def crossover_bytes(p: int, alpha: float, beta: float, gamma: float) -> float:
    """Message size below which halving/doubling beats the ring at p workers.

    The time difference is linear in b (``hd_advantage(b) = A + B*b``), so
    the crossover is b* = -A/B. Returns ``math.inf`` when halving/doubling
    is never slower (power-of-two p: equal bandwidth terms, fewer steps) and
    0.0 when it is never faster (e.g. p = 3).
    """
    a0 = hd_advantage(p, 0.0, alpha, beta, gamma)  # latency terms only
    slope = hd_advantage(p, 1.0, 0.0, beta, gamma)  # per-byte terms only
    if slope >= 0:
        return math.inf if a0 >= 0 else 0.0
    return max(0.0, -a0 / slope)


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lbsgd.commcost``: print the table, write the PNG; returns the exit status."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.commcost",
        description="alpha-beta-gamma model: ring vs recursive halving/doubling allreduce (Goyal et al. §4).",
    )
    ap.add_argument(
        "--message_mb",
        type=cli.positive(float),
        default=DEFAULT_MESSAGE_MB,
        help="message size in MiB (default 100: ResNet-50's ~25.6M float32 gradients)",
    )
    ap.add_argument(
        "--bandwidth_gbit",
        type=cli.positive(float),
        default=DEFAULT_BANDWIDTH_GBIT,
        help="link bandwidth, Gbit/s (default 50, Goyal's Ethernet)",
    )
    ap.add_argument(
        "--latency_us", type=float, default=DEFAULT_LATENCY_US, help="per-message latency alpha in us (default 10)"
    )
    ap.add_argument(
        "--reduce_gbyte_s",
        type=float,
        default=DEFAULT_REDUCE_GBYTE_S,
        help="reduction throughput in GB/s, gamma = 1/this; 0 = free (default 10)",
    )
    ap.add_argument("--max_p", type=cli.positive(int), default=4096, help="largest worker count (default 4096)")
    ap.add_argument(
        "--fixed_p", type=cli.positive(int), default=1000, help="p for the time-vs-message-size panel (default 1000)"
    )
    ap.add_argument("--out", default="commcost.png", help="PNG path; a directory means <dir>/commcost.png")
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
