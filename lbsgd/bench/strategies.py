"""``python -m lbsgd.bench strategies``: one train step of every registered strategy, relative to allreduce.

Every strategy of ``lbsgd.strategies.REGISTRY`` (each with its default topology and options, built by
``lbsgd.strategies.from_config`` as the trainer builds it) runs the real train step
(``lbsgd.train.make_train_step``, goyal_sgd) on the same model, random batch and devices. Each is
compiled (timed apart), warmed up and timed ``--repeats`` times; the table gives the median step time,
its spread, and the ratio of the median to allreduce's (allreduce = 1.00).

The default is a tiny setting that runs in about a minute on a CPU: resnet8 of width 8 on 8x8x1
("digits"-sized) random inputs, k=8 workers x n=16 on 8 devices (simulated CPU devices when JAX runs
on the CPU).
"""

from __future__ import annotations

from typing import Sequence

from lbsgd import cli
from lbsgd.bench import common


def strategy_config(name: str, num_workers: int, seed: int = 0):
    """The smallest config ``lbsgd.strategies.from_config`` needs: strategy ``name`` with its defaults."""
    import ml_collections

    return ml_collections.ConfigDict(
        dict(strategy=name, num_workers=num_workers, aggregation="psum", bucket_mb=25.0, topology="", seed=seed)
    )


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table: one row per strategy, median/min/max step ms and the ratio to allreduce."""
    head = ["strategy", "topology", "median ms", "min ms", "max ms", "IQR ms", "compile s", "vs allreduce"]
    lines = ["| " + " | ".join(head) + " |", "|:---|:---|" + "|".join("---:" for _ in head[2:]) + "|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['strategy']} | {r['topology'] or '-'} | failed: {r['error']} |" + " |" * 5)
            continue
        lines.append(
            f"| {r['strategy']} | {r['topology'] or '-'} | {r['step_time_median_s'] * 1e3:.2f} | "
            f"{r['step_time_min_s'] * 1e3:.2f} | {r['step_time_max_s'] * 1e3:.2f} | {r['step_time_iqr_s'] * 1e3:.2f} | "
            f"{r['compile_s']:.1f} | {r['ratio_to_allreduce']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """``python -m lbsgd.bench strategies``: prints the table, writes ``--json``; 0 unless a strategy failed."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench strategies",
        description="Time one train step of every registered strategy relative to allreduce.",
    )
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--model_width", type=int, default=8, help="channels of the first stage (default 8)")
    ap.add_argument("--image_size", type=cli.positive(int), default=8)
    ap.add_argument("--channels", type=cli.positive(int), default=1)
    ap.add_argument("--num_classes", type=cli.positive(int), default=10)
    ap.add_argument("--num_workers", type=cli.positive(int), default=8, help="k (default 8)")
    ap.add_argument("--per_worker_batch_size", type=cli.positive(int), default=16, help="n (default 16)")
    ap.add_argument("--num_devices", type=int, default=0, help="devices (default 0: min(k, available))")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--strategies", default=None, help="comma-separated subset (default: every registered one)")
    ap.add_argument("--repeats", type=cli.positive(int), default=10, help="timed steps per strategy (default 10)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling (default 1)")
    ap.add_argument("--json", default=None, help="write results to this path")
    args = ap.parse_args(argv)

    common.ensure_host_devices(max(8, args.num_workers if args.num_devices == 0 else args.num_devices))
    import jax

    from lbsgd import strategies as strategies_lib
    from lbsgd.bench.step import build_model, measure_step
    from lbsgd.models import resnet
    from lbsgd.parallel import layout as layout_lib

    if args.model not in resnet.ARCHITECTURES:
        ap.error(f"unknown --model {args.model!r}; valid: {', '.join(resnet.ARCHITECTURES)}")
    names = args.strategies.split(",") if args.strategies else list(strategies_lib.REGISTRY)
    bad = [s for s in names if s not in strategies_lib.REGISTRY]
    if bad:
        ap.error(f"unknown --strategies {','.join(bad)}; valid: {','.join(strategies_lib.REGISTRY)}")
    names = ["allreduce"] + [s for s in names if s != "allreduce"]  # the baseline first
    k, n = args.num_workers, args.per_worker_batch_size
    d = args.num_devices or min(k, len(jax.devices()))
    while k % d:  # the largest device count <= the available ones that divides k
        d -= 1
    try:
        layout = layout_lib.make_layout(k, d)
    except layout_lib.LayoutError as e:
        ap.error(str(e))
    model = build_model(args.model, num_classes=args.num_classes, dtype=args.dtype, width=args.model_width)
    kind = common.device_kind(layout.devices[0])
    print(f"device kind: {kind}; {d} device(s); host cores: {common.host_cores()}; jax {jax.__version__}")
    print(
        f"{args.model} (width {args.model_width}) {args.image_size}x{args.image_size}x{args.channels} {args.dtype}: "
        f"k={k} x n={n} on {d} device(s); median of {args.repeats} steps"
    )
    rows, base = [], None
    for name in names:
        config = strategy_config(name, k)
        row = {"strategy": name, "topology": strategies_lib.topology_of(config)}
        try:
            strategies_lib.check_config(config)
            m = measure_step(
                model,
                layout,
                per_worker_batch_size=n,
                image_size=args.image_size,
                num_classes=args.num_classes,
                repeats=args.repeats,
                warmup=args.warmup,
                strategy=strategies_lib.from_config(config, d),
                channels=args.channels,
            )
        except Exception as e:  # noqa: BLE001 - report, go on with the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"{name:<12} failed: {row['error']}", flush=True)
            rows.append(row)
            continue
        stats = common.summarize(m["times"])
        if name == "allreduce":
            base = stats["median_s"]
        memory = m["memory"] or {}
        row.update(
            compile_s=m["compile_s"],
            **common.time_fields(stats),
            repeats=stats["repeats"],
            images_per_second=k * n / stats["median_s"],
            ratio_to_allreduce=stats["median_s"] / base if base else None,
            peak_memory_bytes=memory.get("peak_memory_bytes"),
            loss=m["loss"],
        )
        rows.append(row)
        ratio = f"x{row['ratio_to_allreduce']:.2f}" if base else "-"
        print(
            f"{name:<12} {row['topology'] or '-':<8} median {stats['median_s'] * 1e3:8.2f} ms "
            f"(min {stats['min_s'] * 1e3:.2f}, max {stats['max_s'] * 1e3:.2f}); compile {m['compile_s']:.1f} s  "
            f"{ratio} allreduce",
            flush=True,
        )
    print()
    print(format_table(rows))
    common.write_json(
        args.json,
        dict(
            device_kind=kind,
            jax_version=jax.__version__,
            model=args.model,
            model_width=args.model_width,
            image_size=args.image_size,
            channels=args.channels,
            dtype=args.dtype,
            num_workers=k,
            per_worker_batch_size=n,
            devices=d,
            repeats=args.repeats,
            rows=rows,
        ),
    )
    return 1 if any(r.get("error") for r in rows) else 0
