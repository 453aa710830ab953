"""ImageNet-side benchmarks: ``python -m lbsgd.bench input`` and ``python -m lbsgd.bench step``.

``input``: images/s of the real tf.data training pipeline (``lbsgd.data.pipeline`` over the folder
dataset) with the 'inception' augmentation of Goyal §5.1 on generated JPEGs, total and per host CPU
core, plus the evaluation view (256 -> 224 center crop). On a GPU host the pipeline must feed
(images/s of the step) / (images/s per core) cores.

``step``: images/s of the real train step (``lbsgd.train.make_train_step``: forward per worker,
loss / kn, gradient, allreduce, Goyal's optimizer update) for one model on random inputs, the median
of ``--repeats`` timed steps, each waited for; also the step's model FLOPs (2 x multiply-adds of its
convolutions and matrix products, counted from the jaxpr) and the FLOP rate they imply.

Neither imports TensorFlow unless it needs it (``step`` runs where only JAX is installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from typing import Sequence

from lbsgd import cli


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


# --------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------


def write_jpegs(
    root: str, num_images: int, width: int, height: int, num_classes: int = 4, seed: int = 0, quality: int = 90
) -> None:
    """Write ``num_images`` JPEGs under ``root/train/c<i>/`` (and a few under ``root/val``).

    Content: smooth random colour fields plus a little noise, so the files compress like photographs
    (~100 KB at 500x375, about the size of an average ImageNet training JPEG).
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for split, count in (("train", num_images), ("val", num_classes)):
        for i in range(count):
            c = i % num_classes
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            low = rng.uniform(0, 255, size=(1, height // 24 + 2, width // 24 + 2, 3)).astype(np.float32)
            img = tf.image.resize(low, [height, width], method="bicubic")[0].numpy()
            img = np.clip(img + rng.normal(0, 18, size=img.shape), 0, 255).astype(np.uint8)
            data = tf.io.encode_jpeg(img, quality=quality).numpy()
            with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
                f.write(data)


def _time_iterator(it, batch_size: int, warmup: int, batches: int) -> float:
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def input_main(argv: Sequence[str]) -> int:
    """``python -m lbsgd.bench input``: images/s (and per core) of the training and eval input pipeline."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench input",
        description="Throughput of the tf.data ImageNet pipeline on generated JPEGs.",
    )
    ap.add_argument(
        "--folder",
        default=None,
        help="an existing folder dataset (train/<class>/*.jpg); default: generate JPEGs in a temporary folder",
    )
    ap.add_argument("--num_images", type=cli.positive(int), default=256, help="JPEGs to generate (default 256)")
    ap.add_argument("--width", type=cli.positive(int), default=500)
    ap.add_argument("--height", type=cli.positive(int), default=375)
    ap.add_argument("--image_size", type=cli.positive(int), default=224)
    ap.add_argument("--batch_size", type=cli.positive(int), default=64, help="images per batch (k·n of one host)")
    ap.add_argument("--batches", type=cli.positive(int), default=12, help="timed batches (default 12)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first (default 2)")
    ap.add_argument("--json", default=None, help="write results to this path")
    args = ap.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lbsgd.data import folder, pipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder
        if root is None:
            root = tmp
            t0 = time.perf_counter()
            write_jpegs(root, args.num_images, args.width, args.height)
            print(
                f"generated {args.num_images} JPEGs of {args.width}x{args.height} in {time.perf_counter() - t0:.1f} s"
            )
        try:
            ds = folder.load(root)
        except pipeline.DataError as e:
            ap.error(str(e))
        if ds.train.num_examples < args.batch_size:
            ap.error(f"--batch_size={args.batch_size} is larger than the {ds.train.num_examples} images")
        sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(root, "train")) for f in fs]
        mean_kb = sum(sizes) / len(sizes) / 1024
        cores = _cores()
        train_it = pipeline.train_iterator(
            ds,
            num_workers=1,
            per_worker_batch_size=args.batch_size,
            seed=0,
            first_worker=0,
            num_local_workers=1,
            start_step=0,
            augment="inception",
            image_size=args.image_size,
        )
        train_ips = _time_iterator(train_it, args.batch_size, args.warmup, args.batches)
        # Evaluation view over the same files, one pass at most.
        eval_ds = dataclasses.replace(ds, eval=ds.train)
        eval_batches = max(1, min(args.batches, ds.train.num_examples // args.batch_size - args.warmup))
        eval_it = pipeline.eval_iterator(
            eval_ds,
            global_batch_size=args.batch_size,
            first_slot=0,
            num_local_slots=args.batch_size,
            augment="inception",
            image_size=args.image_size,
        )
        eval_ips = _time_iterator(eval_it, args.batch_size, min(args.warmup, 1), eval_batches)
    result = dict(
        images=ds.train.num_examples,
        mean_jpeg_kb=mean_kb,
        image_size=args.image_size,
        batch_size=args.batch_size,
        cores=cores,
        train_images_per_s=train_ips,
        train_images_per_s_per_core=train_ips / cores,
        eval_images_per_s=eval_ips,
        eval_images_per_s_per_core=eval_ips / cores,
    )
    print(
        f"host cores: {cores}; {ds.train.num_examples} JPEGs, mean {mean_kb:.0f} KB; output {args.image_size}x"
        f"{args.image_size}, batch {args.batch_size}"
    )
    print(f"train (inception crop + flip): {train_ips:8.1f} images/s  = {train_ips / cores:7.1f} per core")
    print(f"eval  (256 -> 224 center crop): {eval_ips:8.1f} images/s  = {eval_ips / cores:7.1f} per core")
    _write_json(args.json, result)
    return 0


# --------------------------------------------------------------------------
# step
# --------------------------------------------------------------------------


def jaxpr_flops(jaxpr) -> float:
    """Model FLOPs of a jaxpr: 2 x the multiply-adds of every convolution and matrix product, dense.

    Counted from shapes (padding taps included, as the usual "4.1 G multiply-adds" of ResNet-50), the
    same on every backend; XLA's own cost analysis misses convolutions handed to cuDNN on GPU. Bodies of
    ``scan`` count ``length`` times, of ``shard_map`` once per device.
    """
    total = 0.0
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name == "conv_general_dilated":
            rhs, out = e.invars[1].aval.shape, e.outvars[0].aval.shape
            spec = e.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
            macs = math.prod(out) * rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
            # A transposed (input-gradient) strided conv dilates its input with zeros: skip those taps.
            total += 2.0 * macs / math.prod(e.params.get("lhs_dilation") or (1,))
        elif name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            total += 2.0 * math.prod(e.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        times = 1
        if name == "scan":
            times = e.params["length"]
        elif name == "shard_map":
            times = e.params["mesh"].size
        for value in e.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += times * jaxpr_flops(inner)
    return total


def measure_step(
    model,
    layout,
    *,
    per_worker_batch_size: int,
    image_size: int,
    num_classes: int,
    repeats: int,
    warmup: int = 1,
    accumulation_steps: int = 1,
    aggregation: str = "psum",
    count_flops: bool = False,
) -> dict:
    """Time the real train step (``lbsgd.train.make_train_step`` with ``goyal_sgd``) on random inputs.

    k = ``layout.num_workers`` workers of n = ``per_worker_batch_size`` images. Compiles once, runs
    ``warmup`` untimed steps, then ``repeats`` timed ones, each waited for (never two steps in flight:
    the CPU collectives hazard). Returns ``{'times', 'compile_s', 'step_flops', 'loss'}``
    (``step_flops`` = model FLOPs per step from the jaxpr when ``count_flops``, else 0).
    """
    import jax
    import numpy as np

    from lbsgd import optim, strategies, train

    k, n = layout.num_workers, per_worker_batch_size
    schedule = optim.goyal_schedule(0.1, k * n, steps_per_epoch=1000)
    tx = optim.goyal_sgd(schedule)
    state = train.create_train_state(model, tx, layout, (image_size, image_size, 3), seed=0)
    step = train.make_train_step(
        model,
        tx,
        schedule,
        layout,
        per_worker_batch_size=n,
        strategy=strategies.Allreduce(aggregation=aggregation),
        accumulation_steps=accumulation_steps,
    )
    rng = np.random.default_rng(0)
    b = train.global_batch(
        layout,
        {
            "image": rng.normal(size=(k * n, image_size, image_size, 3)).astype(np.float32),
            "label": rng.integers(0, num_classes, size=(k * n,)).astype(np.int32),
        },
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, b["image"], b["label"]).compile()
    compile_s = time.perf_counter() - t0
    flops = jaxpr_flops(jax.make_jaxpr(step)(state, b["image"], b["label"]).jaxpr) if count_flops else 0.0
    for _ in range(max(warmup, 0)):
        state, metrics = compiled(state, b["image"], b["label"])
        jax.block_until_ready((state, metrics))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, b["image"], b["label"])
        jax.block_until_ready((state, metrics))  # never two steps in flight (CPU collectives hazard)
        times.append(time.perf_counter() - t0)
    return {"times": times, "compile_s": compile_s, "step_flops": flops, "loss": float(metrics["loss"])}


def step_main(argv: Sequence[str]) -> int:
    """``python -m lbsgd.bench step``: images/s of the real train step for one model."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench step",
        description="Throughput of lbsgd.train's train step (k workers x n images) on random inputs.",
    )
    ap.add_argument("--model", default="resnet50")
    ap.add_argument(
        "--image_size",
        type=cli.positive(int),
        default=None,
        help="default 224 for ImageNet models, 32 for small-image ones",
    )
    ap.add_argument("--num_classes", type=cli.positive(int), default=1000)
    ap.add_argument("--num_workers", type=cli.positive(int), default=1, help="k (default 1)")
    ap.add_argument("--per_worker_batch_size", type=cli.positive(int), default=8, help="n (default 8; the paper: 32)")
    ap.add_argument("--num_devices", type=cli.positive(int), default=1, help="devices to spread the k workers over")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--aggregation", default="psum")
    ap.add_argument("--repeats", type=cli.positive(int), default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling (default 1)")
    ap.add_argument("--json", default=None, help="write results to this path")
    args = ap.parse_args(argv)

    if args.num_devices > 1:
        from lbsgd.bench import _ensure_host_devices

        _ensure_host_devices(args.num_devices)  # only matters on CPU, and only before JAX starts
    import jax

    from lbsgd import train
    from lbsgd.models import resnet
    from lbsgd.parallel import layout as layout_lib

    if args.model not in resnet.ARCHITECTURES:
        ap.error(f"unknown --model {args.model!r}; valid: {', '.join(resnet.ARCHITECTURES)}")
    small = resnet.ARCHITECTURES[args.model][2] == "small"
    size = args.image_size or (32 if small else 224)
    k, n = args.num_workers, args.per_worker_batch_size
    try:
        layout = layout_lib.make_layout(k, args.num_devices)
    except layout_lib.LayoutError as e:
        ap.error(str(e))
    model = resnet.create_model(args.model, num_classes=args.num_classes, dtype=train._dtype(args.dtype))
    m = measure_step(
        model,
        layout,
        per_worker_batch_size=n,
        image_size=size,
        num_classes=args.num_classes,
        repeats=args.repeats,
        warmup=args.warmup,
        aggregation=args.aggregation,
        count_flops=True,
    )
    times, compile_s, flops = m["times"], m["compile_s"], m["step_flops"]
    med = statistics.median(times)
    dev = layout.devices[0]
    kind = f"{dev.platform}: {dev.device_kind}"
    ips = k * n / med
    result = dict(
        model=args.model,
        image_size=size,
        dtype=args.dtype,
        num_workers=k,
        per_worker_batch_size=n,
        global_batch_size=k * n,
        devices=layout.num_devices,
        device_kind=kind,
        host_cores=_cores(),
        jax_version=jax.__version__,
        compile_s=compile_s,
        repeats=args.repeats,
        median_step_s=med,
        min_step_s=min(times),
        images_per_second=ips,
        step_flops=flops,
        tflops_per_second=flops / med / 1e12,
        loss=m["loss"],
    )
    print(f"device kind: {kind}; {layout.num_devices} device(s); host cores: {_cores()}; jax {jax.__version__}")
    print(f"{args.model} {size}x{size} {args.dtype}: k={k} x n={n} = {k * n} images/step; compile {compile_s:.1f} s")
    print(
        f"median step {med * 1e3:.1f} ms over {args.repeats}: {ips:.1f} images/s; "
        f"{flops / 1e9:.1f} GFLOP/step (model) = {flops / med / 1e12:.2f} TFLOP/s"
    )
    _write_json(args.json, result)
    return 0
