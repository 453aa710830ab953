"""``python -m lbsgd.bench strategies``: one train step of every registered strategy, relative to allreduce.

Every strategy of ``lbsgd.strategies.registry`` (each with its default topology and options: the run
config's ``strategy`` field set to its name, its option section at the defaults) runs the real train
step, built as a run builds it (``lbsgd.trainer.build`` through ``lbsgd.bench.harness``, goyal_sgd), on
the same model, random batch and devices. Each is compiled (timed apart), warmed up and timed
``--repeats`` times; the table gives the median step time, its spread, and the ratio of the median to
allreduce's (allreduce = 1.00).

The default is a tiny setting that runs in about a minute on a CPU: resnet8 of width 8 on 8x8x1
("digits"-sized) random inputs, k=8 workers x n=16 on 8 devices (simulated CPU devices when JAX runs
on the CPU).
"""

from __future__ import annotations

from typing import Sequence

from lbsgd import cli
from lbsgd.bench import common


EXAMPLES = (
    "python -m lbsgd.bench strategies",
    "python -m lbsgd.bench strategies --strategies=allreduce,dpsgd,easgd --repeats=5",
    "python -m lbsgd.bench strategies --num_workers=16 --num_devices=8 --dtype=bfloat16 --json=strategies.json",
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``bench strategies``."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench strategies",
        description="Time one train step of every registered strategy relative to allreduce.",
        examples=EXAMPLES,
    )
    ap.add_argument("--model", default="resnet8", help="a ResNet of lbsgd.models.resnet (resnet4 ... resnet152)")
    ap.add_argument("--model_width", type=int, default=8, help="channels of the first stage; 0 = the model's")
    ap.add_argument("--image_size", type=cli.positive(int), default=8, help="input size in pixels")
    ap.add_argument("--channels", type=cli.positive(int), default=1, help="input channels")
    ap.add_argument("--num_classes", type=cli.positive(int), default=10, help="classes of the random labels")
    ap.add_argument("--num_workers", type=cli.positive(int), default=8, help="k, workers")
    ap.add_argument("--per_worker_batch_size", type=cli.positive(int), default=16, help="n, images per worker")
    ap.add_argument("--num_devices", type=int, default=0, help="devices (default 0: min(k, available))")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--strategies", default=None, help="comma-separated subset (default: every registered one)")
    ap.add_argument("--repeats", type=cli.positive(int), default=10, help="timed steps per strategy")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    ap.add_argument("--json", default=None, help="write results to this path")
    return ap


def resolve(ap: cli.ArgumentParser, args):
    """Start JAX and resolve the flags: ``(names, layout)``, the strategies to time (allreduce, the
    baseline, first) and the workers' layout on d devices; refuses bad flags in one line (exit 2)."""
    # Imported here, not at module level: JAX must start after ensure_host_devices has set XLA_FLAGS.
    import jax

    from lbsgd.models import resnet
    from lbsgd.parallel import layout as layout_lib
    from lbsgd.strategies import registry

    if args.model not in resnet.ARCHITECTURES:
        ap.error(f"unknown --model {args.model!r}; valid: {', '.join(resnet.ARCHITECTURES)}")
    valid = registry.names()
    names = args.strategies.split(",") if args.strategies else list(valid)
    bad = [s for s in names if s not in valid]
    if bad:
        ap.error(f"unknown --strategies {','.join(bad)}; valid: {','.join(valid)}")
    names = ["allreduce"] + [s for s in names if s != "allreduce"]  # the baseline first
    k = args.num_workers
    d = args.num_devices or min(k, len(jax.devices()))
    while k % d:  # the largest device count <= the available ones that divides k
        d -= 1
    try:
        layout = layout_lib.make_layout(k, d)
    except layout_lib.LayoutError as e:
        ap.error(str(e))
    return names, layout


def measure_strategy(args, name: str, layout, base: float | None) -> dict:
    """One table row: strategy ``name``'s step timed on ``layout``, its ratio to ``base`` (allreduce's
    median, None before it is known); on any failure the row holds ``error`` (one line) instead."""
    from lbsgd.bench import harness  # imports JAX: kept off the module level (see ``resolve``)
    from lbsgd.strategies import registry

    config = harness.bench_config(
        args.model,
        num_workers=args.num_workers,
        per_worker_batch_size=args.per_worker_batch_size,
        image_size=args.image_size,
        dtype=args.dtype,
        model_width=args.model_width,
        strategy=name,
    )
    row = {"strategy": name, "topology": registry.topology_of(config)}
    try:
        registry.check_config(config)
        program = harness.build_program(config, layout, num_classes=args.num_classes, channels=args.channels)
        m = harness.measure_step(program, num_classes=args.num_classes, repeats=args.repeats, warmup=args.warmup)
    except Exception as e:  # noqa: BLE001 - report, go on with the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    stats = common.summarize(m["times"])
    base = stats["median_s"] if name == "allreduce" else base
    memory = m["memory"] or {}
    row.update(
        compile_s=m["compile_s"],
        **common.time_fields(stats),
        repeats=stats["repeats"],
        images_per_second=args.num_workers * args.per_worker_batch_size / stats["median_s"],
        ratio_to_allreduce=stats["median_s"] / base if base else None,
        peak_memory_bytes=memory.get("peak_memory_bytes"),
        loss=m["loss"],
    )
    return row


def format_line(row: dict) -> str:
    """The progress line of one row: median, min and max step ms, compile s and the ratio to allreduce."""
    if row.get("error"):
        return f"{row['strategy']:<12} failed: {row['error']}"
    ratio = f"x{row['ratio_to_allreduce']:.2f}" if row["ratio_to_allreduce"] is not None else "-"
    return (
        f"{row['strategy']:<12} {row['topology'] or '-':<8} median {row['step_time_median_s'] * 1e3:8.2f} ms "
        f"(min {row['step_time_min_s'] * 1e3:.2f}, max {row['step_time_max_s'] * 1e3:.2f}); "
        f"compile {row['compile_s']:.1f} s  {ratio} allreduce"
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
    ap = make_parser()
    args = ap.parse_args(argv)
    common.ensure_host_devices(max(8, args.num_workers if args.num_devices == 0 else args.num_devices))
    names, layout = resolve(ap, args)
    import jax  # started by ``resolve``

    k, n, d = args.num_workers, args.per_worker_batch_size, layout.num_devices
    kind = common.device_kind(layout.devices[0])
    print(f"device kind: {kind}; {d} device(s); host cores: {common.host_cores()}; jax {jax.__version__}")
    print(
        f"{args.model} (width {args.model_width}) {args.image_size}x{args.image_size}x{args.channels} {args.dtype}: "
        f"k={k} x n={n} on {d} device(s); median of {args.repeats} steps"
    )
    rows, base = [], None
    for name in names:
        row = measure_strategy(args, name, layout, base)
        if name == "allreduce" and not row.get("error"):
            base = row["step_time_median_s"]
        rows.append(row)
        print(format_line(row), flush=True)
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
