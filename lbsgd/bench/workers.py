r"""``python -m lbsgd.bench workers``: what it costs to run m of Goyal's workers on one device.

For each m, the real train step (the one a run trains with: ``lbsgd.trainer.build`` through
``lbsgd.bench.harness``, goyal_sgd) runs m workers x n examples on one device in three ways and reports
images/s (median over repeats, compilation timed apart) and the peak device memory of the compiled step
(XLA's memory analysis):

* ``vmap``       all m workers in one pass, per-worker BN statistics (the default);
* ``accumulate`` m sequential microsteps of one worker each (least memory);
* ``one_bn``     a single worker of m·n examples — the same compute, but BN over m·n, i.e. *not*
                 the experiment being emulated; the baseline that shows the cost of exactness.

Ratios are against ``one_bn`` in the same run.
"""

from __future__ import annotations

import sys
from typing import Sequence

from lbsgd import cli
from lbsgd.bench import common

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MODES = ("vmap", "accumulate", "one_bn")


EXAMPLES = (
    "python -m lbsgd.bench workers --model=resnet8 --image_size=8 --per_worker_batch_size=8 --workers=1,2 --repeats=3",
    "python -m lbsgd.bench workers --model=resnet50 --workers=1,2,4,8 --json=workers.json",
    "python -m lbsgd.bench workers --model=resnet18 --image_size=64 --modes=vmap,one_bn --dtype=float32",
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``bench workers``."""
    p = cli.ArgumentParser(
        prog="python -m lbsgd.bench workers",
        description="Cost of m of Goyal's workers on one device: vmap vs accumulate vs one BN, with peak memory.",
        examples=EXAMPLES,
    )
    p.add_argument("--model", default="resnet50", help="a ResNet of lbsgd.models.resnet (resnet4 ... resnet152)")
    p.add_argument(
        "--image_size", type=int, default=None, help="input size in pixels (default: 224 for ImageNet models, 32 else)"
    )
    p.add_argument("--per_worker_batch_size", type=cli.positive(int), default=32, help="n, images per worker")
    p.add_argument("--workers", default="1,2,4,8", help="comma-separated m values (workers per device)")
    p.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated ways to run the m workers: " + ", ".join(MODES)
    )
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--repeats", type=cli.positive(int), default=10, help="timed steps per point")
    p.add_argument("--json", default=None, help="write results to this path")
    return p


def time_workers(model_name: str, image_size: int, dtype: str, m: int, n: int, mode: str, repeats: int) -> dict:
    """One step of m workers x n images on one device, run the way ``mode`` says.

    Returns ``common.summarize`` of the timed steps plus ``compile_s`` and ``peak_memory_bytes``
    (per device, XLA's memory analysis; None where the backend has none).
    """
    # Imported here, not at module level: they import JAX, which must not start before flags are parsed.
    from lbsgd.bench import harness
    from lbsgd.parallel import layout as layout_lib

    k, n_eff, acc = (1, m * n, 1) if mode == "one_bn" else (m, n, m if mode == "accumulate" else 1)
    num_classes = 1000 if image_size >= 64 else 10
    config = harness.bench_config(
        model_name,
        num_workers=k,
        per_worker_batch_size=n_eff,
        image_size=image_size,
        dtype=dtype,
        accumulation_steps=acc,
    )
    program = harness.build_program(config, layout_lib.make_layout(k, 1), num_classes=num_classes)
    result = harness.measure_step(program, num_classes=num_classes, repeats=repeats)
    memory = result["memory"] or {}
    return {
        **common.summarize(result["times"]),
        "compile_s": result["compile_s"],
        "peak_memory_bytes": memory.get("peak_memory_bytes"),
    }


def measure_row(args, m: int, modes: Sequence[str]) -> dict:
    """Images/s, median step time and peak memory of every mode for m workers (None where a mode failed)."""
    n = args.per_worker_batch_size
    row = {"m": m, "examples": m * n}
    for md in modes:
        if md == "accumulate" and m == 1:  # one worker: nothing to accumulate, the same program as vmap
            for key in ("", "_peak_memory_bytes", "_step_time_median_s"):
                row[md + key] = row.get("vmap" + key)
            continue
        try:
            t = time_workers(args.model, args.image_size, args.dtype, m, n, md, args.repeats)
            row[md] = m * n / t["median_s"]
            row[md + "_step_time_median_s"] = t["median_s"]
            row[md + "_peak_memory_bytes"] = t["peak_memory_bytes"]
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at large m: report and go on
            row[md] = row[md + "_step_time_median_s"] = row[md + "_peak_memory_bytes"] = None
            print(f"   m={m} {md}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return row


def header(modes: Sequence[str]) -> str:
    """The table's header line: m, examples, images/s and MiB per mode, the ratios."""
    return (
        f"{'m':>3} {'examples':>8} "
        + " ".join(f"{md + ' img/s':>16}" for md in modes)
        + " "
        + " ".join(f"{md + ' MiB':>14}" for md in modes)
        + "   ratios to one_bn"
    )


def format_row(row: dict, modes: Sequence[str]) -> str:
    """One table line: images/s and peak MiB per mode ('-' where none) and the ratios to one_bn."""
    base = row.get("one_bn")
    ratios = " ".join(f"{md}={row[md] / base:.2f}" for md in modes if md != "one_bn" and row.get(md) and base)
    mem = [row.get(md + "_peak_memory_bytes") for md in modes]
    return (
        f"{row['m']:>3} {row['examples']:>8} "
        + " ".join(f"{row[md]:>16.1f}" if row.get(md) else f"{'-':>16}" for md in modes)
        + " "
        + " ".join(f"{b / (1 << 20):>14.1f}" if b else f"{'-':>14}" for b in mem)
        + f"   {ratios}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints a table (images/s and peak MiB per mode) and returns 0."""
    ap = make_parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        ap.error(f"unknown --modes {','.join(unknown)}; use some of: {','.join(MODES)}")
    import jax  # after the flags: see ``time_workers``

    args.image_size = args.image_size or (224 if args.model in IMAGENET_MODELS else 32)
    ms = [int(x) for x in args.workers.split(",")]
    modes = args.modes.split(",")
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({jax.default_backend()}), model {args.model} at {args.image_size}x"
        f"{args.image_size}, {args.dtype}, n={args.per_worker_batch_size} per worker, median of {args.repeats}"
    )
    rows = []
    print(header(modes))
    for m in ms:
        row = measure_row(args, m, modes)
        print(format_row(row, modes))
        rows.append(row)
    common.write_json(
        args.json,
        {
            "device": dev.device_kind,
            "backend": jax.default_backend(),
            "model": args.model,
            "image_size": args.image_size,
            "dtype": args.dtype,
            "rows": rows,
        },
    )
    return 0
