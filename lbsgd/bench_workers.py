r"""``python -m lbsgd.bench workers``: what it costs to run m of Goyal's workers on one device.

For each m, the real train step (lbsgd.train.make_train_step, goyal_sgd) runs m workers x n examples
on one device in three ways and reports images/s (median over repeats, after compilation):

* ``vmap``       all m workers in one pass, per-worker BN statistics (the default);
* ``accumulate`` m sequential microsteps of one worker each (least memory);
* ``one_bn``     a single worker of m·n examples — the same compute, but BN over m·n, i.e. *not*
                 the experiment being emulated; the baseline that shows the cost of exactness.

Ratios are against ``one_bn`` in the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from lbsgd import cli


def _parse(argv):
    p = cli.ArgumentParser(prog="python -m lbsgd.bench workers", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image_size", type=int, default=None, help="default: 224 for ImageNet models, 32 otherwise")
    p.add_argument("--per_worker_batch_size", type=cli.positive(int), default=32)
    p.add_argument("--workers", default="1,2,4,8", help="comma-separated m values (workers per device)")
    p.add_argument("--modes", default="vmap,accumulate,one_bn")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=cli.positive(int), default=10)
    p.add_argument("--json", default=None, help="write results to this path")
    return p.parse_args(argv)


def _time_step(model_name, image_size, dtype, m, n, mode, repeats):
    """Median seconds per step of m workers x n images on one device, run the way ``mode`` says."""
    import jax.numpy as jnp

    from lbsgd.bench_imagenet import measure_step
    from lbsgd.models import resnet
    from lbsgd.parallel import layout as layout_lib

    k, n_eff, acc = (1, m * n, 1) if mode == "one_bn" else (m, n, m if mode == "accumulate" else 1)
    num_classes = 1000 if image_size >= 64 else 10
    model = resnet.create_model(
        model_name, num_classes=num_classes, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    )
    result = measure_step(
        model,
        layout_lib.make_layout(k, 1),
        per_worker_batch_size=n_eff,
        image_size=image_size,
        num_classes=num_classes,
        repeats=repeats,
        accumulation_steps=acc,
    )
    return statistics.median(result["times"])


def main(argv=None) -> int:
    """Run the benchmark; prints a table and returns 0."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    import jax

    image_size = args.image_size or (
        224 if args.model in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152") else 32
    )
    ms = [int(x) for x in args.workers.split(",")]
    modes = args.modes.split(",")
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({jax.default_backend()}), model {args.model} at {image_size}x{image_size}, "
        f"{args.dtype}, n={args.per_worker_batch_size} per worker, median of {args.repeats}"
    )
    rows = []
    print(f"{'m':>3} {'examples':>8} " + " ".join(f"{md + ' img/s':>16}" for md in modes) + "   ratios to one_bn")
    for m in ms:
        row = {"m": m, "examples": m * args.per_worker_batch_size}
        for md in modes:
            if md == "accumulate" and m == 1:
                row[md] = row.get("vmap")
                continue
            try:
                sec = _time_step(args.model, image_size, args.dtype, m, args.per_worker_batch_size, md, args.repeats)
                row[md] = m * args.per_worker_batch_size / sec
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at large m: report and go on
                row[md] = None
                print(f"   m={m} {md}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        base = row.get("one_bn")
        ratios = " ".join(f"{md}={row[md] / base:.2f}" for md in modes if md != "one_bn" and row.get(md) and base)
        print(
            f"{m:>3} {row['examples']:>8} "
            + " ".join(f"{row[md]:>16.1f}" if row.get(md) else f"{'-':>16}" for md in modes)
            + f"   {ratios}"
        )
        rows.append(row)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": dev.device_kind,
                    "backend": jax.default_backend(),
                    "model": args.model,
                    "image_size": image_size,
                    "dtype": args.dtype,
                    "rows": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
