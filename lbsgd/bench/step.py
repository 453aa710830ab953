"""``python -m lbsgd.bench step``: speed of the real train step, its FLOPs, MFU and memory.

The step is ``lbsgd.train.make_train_step`` (forward per worker, loss / kn, gradient, allreduce,
Goyal's optimizer update) for one model on random inputs, k workers x n images over d devices. Reported:

* ``compile_s``: ahead-of-time compilation, apart from the timed steps;
* ``step_time_*``: median and spread (min, max, quartiles, IQR) over ``--repeats`` timed windows (after
  ``--warmup`` untimed ones) of seconds per step; a window is ``--in_flight`` steps dispatched back to
  back and then waited for (1 on CPU: every step waited for; 4 on an accelerator, where the training loop
  does not wait on each step either); ``images_per_second`` = kn / median;
* ``flops_per_step``: model FLOPs, 2 x the multiply-adds of every convolution and matrix product in the
  step's jaxpr (``jaxpr_flops``; XLA's own count, ``xla_flops_per_device_step``, is shown beside it);
* ``achieved_flops_per_s`` = flops_per_step / median; ``peak_flops_per_s``: *measured* here, on the same
  devices and in the step's dtype (``common.measure_peak_flops``: chained large matmuls, best of a few);
  ``mfu`` = achieved / peak;
* ``peak_memory_bytes``: per device, from XLA's memory analysis of the compiled step (arguments +
  outputs + temporaries - donated buffers the outputs reuse).

``--peer=flax --flax-dir=PATH`` also times the Flax ImageNet example's own ``train_step`` (its
``train.py`` and ``models.py``, imported by path from a checkout of google/flax ``examples/imagenet``) on
the same model, batch and devices in the same run, and prints lbsgd's images/s over Flax's.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from typing import Sequence

from lbsgd import cli
from lbsgd.bench import common

#: Steps a timed window keeps in flight off CPU by default: the training loop does not wait on each step
#: there, so the host dispatches the next step while the device runs this one.
IN_FLIGHT_OFF_CPU = 4

#: lbsgd model name -> the Flax ImageNet example's ``models.<name>`` (the same ResNet v1.5).
FLAX_MODELS = {
    "resnet18": "ResNet18",
    "resnet34": "ResNet34",
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "resnet152": "ResNet152",
}


def jaxpr_flops(jaxpr) -> float:
    """Model FLOPs of a jaxpr: 2 x the multiply-adds of every convolution and matrix product, dense.

    Counted from shapes (padding taps included, as the usual "4.1 G multiply-adds" of ResNet-50), the
    same on every backend; XLA's own cost analysis misses convolutions handed to cuDNN on GPU. Bodies of
    ``scan`` count ``length`` times, of ``shard_map`` once per device, of ``pmap`` once per replica.
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
        elif name == "xla_pmap":
            times = e.params["axis_size"]
        for value in e.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += times * jaxpr_flops(inner)
    return total


def build_model(name: str, *, num_classes: int, dtype: str, width: int = 0):
    """lbsgd's model ``name`` at ``dtype`` ('float32' | 'bfloat16' | 'float16'), built by
    ``lbsgd.train.build_model`` as the trainer builds it; ``width`` 0 keeps the model's default width."""
    import ml_collections

    from lbsgd import train

    config = ml_collections.ConfigDict({"model": name, "dtype": dtype, "model_width": width, "model_stem": ""})
    return train.build_model(config, num_classes)


def random_batch(num_examples: int, image_size: int, num_classes: int, channels: int = 3, seed: int = 0):
    """Random float32 images (N(0, 1)) and int32 labels, on the host; the same for every benchmark."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num_examples, image_size, image_size, channels)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(num_examples,)).astype(np.int32)
    return images, labels


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
    strategy=None,
    channels: int = 3,
    count_flops: bool = False,
    in_flight: int = 1,
    profile_dir: str | None = None,
) -> dict:
    """Time the real train step (``lbsgd.train.make_train_step`` with ``goyal_sgd``) on random inputs.

    k = ``layout.num_workers`` workers of n = ``per_worker_batch_size`` images; ``strategy`` defaults to
    allreduce with ``aggregation``. Compiles ahead of time (timed apart), then ``common.time_steps``:
    ``warmup`` untimed windows and ``repeats`` timed ones of ``in_flight`` steps each, waited for at the
    end of the window (1, the default, waits on every step: never two steps in flight, the CPU
    collectives hazard); ``times`` are seconds per step. With ``profile_dir``, one more window runs
    under ``jax.profiler.trace`` there (after the timing, so the timing is not the profiler's).
    Returns ``{'times', 'compile_s', 'step_flops', 'xla_flops', 'memory', 'loss', 'profile_error'}``:
    ``step_flops`` = model FLOPs per step from the jaxpr when ``count_flops`` (else 0), ``xla_flops`` = XLA's cost
    analysis per device (or None), ``memory`` = ``common.memory_analysis`` of the compiled step (or None).
    """
    import jax

    from lbsgd import optim, strategies, train

    k, n = layout.num_workers, per_worker_batch_size
    strategy = strategy or strategies.Allreduce(aggregation=aggregation)
    schedule = optim.goyal_schedule(0.1, k * n, steps_per_epoch=1000)
    tx = optim.goyal_sgd(schedule)
    state = train.create_train_state(model, tx, layout, (image_size, image_size, channels), seed=0, strategy=strategy)
    step = train.make_train_step(
        model,
        tx,
        schedule,
        layout,
        per_worker_batch_size=n,
        strategy=strategy,
        accumulation_steps=accumulation_steps,
    )
    images, labels = random_batch(k * n, image_size, num_classes, channels)
    b = train.global_batch(layout, {"image": images, "label": labels})
    compiled, compile_s = common.compile_timed(step, state, b["image"], b["label"])
    flops = jaxpr_flops(jax.make_jaxpr(step)(state, b["image"], b["label"]).jaxpr) if count_flops else 0.0
    carry = {"state": state}

    def one_step():
        carry["state"], carry["metrics"] = compiled(carry["state"], b["image"], b["label"])

    def wait():
        jax.block_until_ready((carry["state"], carry["metrics"]))

    times = common.time_steps(one_step, wait, repeats=repeats, warmup=warmup, in_flight=in_flight)
    profile_error = None
    if profile_dir:
        try:
            with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
                common.time_steps(one_step, wait, repeats=1, warmup=0, in_flight=in_flight)
        except Exception as e:  # noqa: BLE001 - a profiler that cannot run must not cost the timing
            profile_error = f"{type(e).__name__}: {e}"
    return {
        "times": times,
        "compile_s": compile_s,
        "step_flops": flops,
        "xla_flops": common.xla_flops(compiled),
        "memory": common.memory_analysis(compiled),
        "loss": float(carry["metrics"]["loss"]),
        "profile_error": profile_error,
    }


# --------------------------------------------------------------------------
# the Flax ImageNet example as a peer
# --------------------------------------------------------------------------


class PeerError(Exception):
    """The Flax example could not be found or imported (one line, for the command line)."""


def find_flax_example(flax_dir: str) -> str:
    """The folder holding the Flax ImageNet example's train.py and models.py: ``flax_dir`` itself or
    ``flax_dir/examples/imagenet`` (a whole google/flax checkout); raises PeerError if neither has them."""
    for d in (flax_dir, os.path.join(flax_dir, "examples", "imagenet")):
        if all(os.path.isfile(os.path.join(d, f)) for f in ("train.py", "models.py")):
            return d
    raise PeerError(
        f"--flax-dir={flax_dir!r} has no train.py and models.py (point it at a checkout of google/flax, "
        "or at its examples/imagenet)"
    )


def _load_by_path(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_flax_example(flax_dir: str):
    """Import the Flax ImageNet example's ``train`` and ``models`` modules by path: ``(train, models)``.

    Its train.py does ``import input_pipeline`` and ``import models``; those names are bound to the
    example's own files while it loads and restored afterwards. TensorFlow (which it imports) is kept
    off the GPUs, as the example's main.py does. Raises PeerError (one line) if it cannot be imported.
    """
    import jax

    folder = find_flax_example(flax_dir)
    if jax.default_backend() == "gpu":
        try:
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")
        except Exception:  # noqa: BLE001 - no TensorFlow: train.py's own import will say so
            pass
    saved = {name: sys.modules.get(name) for name in ("models", "input_pipeline")}
    try:
        models = _load_by_path("models", os.path.join(folder, "models.py"))
        if os.path.isfile(os.path.join(folder, "input_pipeline.py")):
            _load_by_path("input_pipeline", os.path.join(folder, "input_pipeline.py"))
        train = _load_by_path("lbsgd_bench_flax_imagenet_train", os.path.join(folder, "train.py"))
    except Exception as e:  # noqa: BLE001 - report any import failure in one line
        raise PeerError(f"cannot import the Flax example from {folder}: {type(e).__name__}: {e}") from None
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return train, models


def measure_flax_step(
    flax_train,
    flax_models,
    *,
    model: str,
    width: int,
    dtype: str,
    num_classes: int,
    devices: Sequence,
    images,
    labels,
    repeats: int,
    warmup: int = 1,
    count_flops: bool = False,
    in_flight: int = 1,
) -> dict:
    """Time the Flax ImageNet example's own ``train_step``, pmapped over ``devices`` as its
    ``train_and_evaluate`` does it (``in_axes=(None, 0)``, axis 'batch'), on the global batch
    ``images``/``labels`` split evenly over the devices. The model is ``models.<FLAX_MODELS[model]>`` at
    ``dtype`` with ``num_filters=width``; its optimizer is the example's (SGD, Nesterov momentum, L2 in the
    loss); no loss scaling (``half_precision`` off: ``dtype`` is set directly). Timed like
    ``measure_step`` (``in_flight`` steps a window); returns ``{'times', 'compile_s', 'step_flops', 'loss'}``.
    """
    import functools

    import jax
    import jax.numpy as jnp
    import ml_collections

    devices = list(devices)
    d = len(devices)
    global_batch, image_size = images.shape[0], images.shape[1]
    flax_train.NUM_CLASSES = num_classes  # its loss one-hots against this module constant
    net = getattr(flax_models, FLAX_MODELS[model])(num_classes=num_classes, dtype=jnp.dtype(dtype), num_filters=width)
    config = ml_collections.ConfigDict(
        dict(half_precision=False, momentum=0.9, learning_rate=0.1, warmup_epochs=5.0, num_epochs=100.0)
    )
    lr_fn = flax_train.create_learning_rate_fn(config, 0.1 * global_batch / 256, 1000)
    with jax.default_device(devices[0]):
        state = flax_train.create_train_state(jax.random.key(0), config, net, image_size, lr_fn)
    p_train_step = jax.pmap(
        functools.partial(flax_train.train_step, learning_rate_fn=lr_fn),
        in_axes=(None, 0),
        out_axes=(None, 0),
        axis_name="batch",
        devices=devices,
    )
    to_devices = jax.pmap(lambda x: x, devices=devices)
    batch = {
        "image": to_devices(images.reshape(d, global_batch // d, *images.shape[1:])),
        "label": to_devices(labels.reshape(d, global_batch // d)),
    }
    compiled, compile_s = common.compile_timed(p_train_step, state, batch)
    flops = jaxpr_flops(jax.make_jaxpr(p_train_step)(state, batch).jaxpr) if count_flops else 0.0
    carry = {"state": state}

    def one_step():
        carry["state"], carry["metrics"] = compiled(carry["state"], batch)

    def wait():
        jax.block_until_ready((carry["state"], carry["metrics"]))

    times = common.time_steps(one_step, wait, repeats=repeats, warmup=warmup, in_flight=in_flight)
    return {"times": times, "compile_s": compile_s, "step_flops": flops, "loss": float(carry["metrics"]["loss"][0])}


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def format_rate(x: float, unit: str = "FLOP/s") -> str:
    """1.5e12 -> '1.50 TFLOP/s' (k, M, G, T, P prefixes)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def _ms(stats: dict) -> str:
    return (
        f"median {stats['median_s'] * 1e3:.2f} ms (min {stats['min_s'] * 1e3:.2f}, max {stats['max_s'] * 1e3:.2f}, "
        f"IQR {stats['iqr_s'] * 1e3:.2f}) over {stats['repeats']}"
    )


def main(argv: Sequence[str]) -> int:
    """``python -m lbsgd.bench step``: images/s, FLOPs, MFU and memory of the real train step."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench step",
        description="Throughput, MFU and memory of lbsgd.train's train step (k workers x n images) on random inputs.",
    )
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--model_width", type=int, default=0, help="channels of the first stage (default: the model's)")
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
    ap.add_argument("--warmup", type=int, default=1, help="untimed windows after compiling (default 1)")
    ap.add_argument(
        "--in_flight",
        type=int,
        default=0,
        help=f"steps dispatched before each wait (default 0: 1 on CPU, {IN_FLIGHT_OFF_CPU} on an accelerator)",
    )
    ap.add_argument(
        "--peak_size", type=int, default=0, help="matrix size of the peak-FLOP/s matmul (default: 512 CPU, 8192 else)"
    )
    ap.add_argument("--peak_repeats", type=cli.positive(int), default=3, help="peak matmul calls; best taken (3)")
    ap.add_argument("--peer", default=None, choices=("flax",), help="also time a peer's train step: 'flax'")
    ap.add_argument(
        "--flax-dir",
        "--flax_dir",
        dest="flax_dir",
        default=None,
        help="a google/flax checkout (or its examples/imagenet), for --peer=flax",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, profile one window into DIR (jax.profiler: TensorBoard, Perfetto) and print its top ops",
    )
    ap.add_argument("--json", default=None, help="write results to this path")
    args = ap.parse_args(argv)

    if args.peer == "flax" and not args.flax_dir:
        ap.error("--peer=flax needs --flax-dir=PATH (a checkout of google/flax, or its examples/imagenet)")
    if args.flax_dir and args.peer != "flax":
        ap.error("--flax-dir is only used with --peer=flax")
    if args.peer == "flax" and args.model not in FLAX_MODELS:
        ap.error(f"--peer=flax needs an ImageNet model the Flax example has: {', '.join(FLAX_MODELS)}")
    if args.peer == "flax":
        try:
            find_flax_example(args.flax_dir)
        except PeerError as e:
            ap.error(str(e))
    if args.num_devices > 1:
        common.ensure_host_devices(args.num_devices)  # only matters on CPU, and only before JAX starts
    import jax

    from lbsgd.models import resnet
    from lbsgd.parallel import layout as layout_lib

    if args.model not in resnet.ARCHITECTURES:
        ap.error(f"unknown --model {args.model!r}; valid: {', '.join(resnet.ARCHITECTURES)}")
    small = resnet.ARCHITECTURES[args.model][2] == "small"
    size = args.image_size or (32 if small else 224)
    width = args.model_width or (16 if small else 64)
    k, n = args.num_workers, args.per_worker_batch_size
    try:
        layout = layout_lib.make_layout(k, args.num_devices)
    except layout_lib.LayoutError as e:
        ap.error(str(e))
    if args.in_flight < 0:
        ap.error(f"--in_flight={args.in_flight} must be >= 0 (0: automatic)")
    on_cpu = layout.devices[0].platform == "cpu"
    in_flight = args.in_flight or (1 if on_cpu else IN_FLIGHT_OFF_CPU)
    if on_cpu and layout.num_devices > 1 and in_flight > 1:
        ap.error(
            f"--in_flight={in_flight} on {layout.num_devices} simulated CPU devices can abort in the collectives' "
            "rendezvous; use --in_flight=1 (or --num_devices=1)"
        )
    flax_modules = None
    if args.peer == "flax":
        try:
            flax_modules = load_flax_example(args.flax_dir)
        except PeerError as e:
            ap.error(str(e))

    model = build_model(args.model, num_classes=args.num_classes, dtype=args.dtype, width=width)
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
        in_flight=in_flight,
        profile_dir=args.profile,
    )
    stats = common.summarize(m["times"])
    med, flops = stats["median_s"], m["step_flops"]
    devices = list(layout.devices)
    peak = common.measure_peak_flops(devices, args.dtype, size=args.peak_size, repeats=args.peak_repeats)
    achieved = common.flops_per_second(flops, med)
    memory = m["memory"] or {}
    kind = common.device_kind(devices[0])
    ips = k * n / med
    result = dict(
        model=args.model,
        model_width=width,
        image_size=size,
        num_classes=args.num_classes,
        dtype=args.dtype,
        num_workers=k,
        per_worker_batch_size=n,
        global_batch_size=k * n,
        devices=layout.num_devices,
        device_kind=kind,
        host_cores=common.host_cores(),
        jax_version=jax.__version__,
        compile_s=m["compile_s"],
        warmup=args.warmup,
        repeats=stats["repeats"],
        in_flight=in_flight,
        **common.time_fields(stats, keys=("median", "min", "max", "q25", "q75", "iqr")),
        images_per_second=ips,
        flops_per_step=flops,
        step_flops=flops,  # the name earlier versions wrote
        xla_flops_per_device_step=m["xla_flops"],
        achieved_flops_per_s=achieved,
        **peak,
        mfu=common.mfu(achieved, peak["peak_flops_per_s"]),
        peak_memory_bytes=memory.get("peak_memory_bytes"),
        memory_analysis=memory or None,
        loss=m["loss"],
    )
    cores = common.host_cores()
    print(f"device kind: {kind}; {layout.num_devices} device(s); host cores: {cores}; jax {jax.__version__}")
    print(
        f"{args.model} (width {width}) {size}x{size} {args.dtype}: k={k} x n={n} = {k * n} images/step; "
        f"compile {m['compile_s']:.1f} s"
    )
    print(f"step {_ms(stats)}, {in_flight} in flight: {ips:.1f} images/s")
    print(
        f"model FLOPs {flops / 1e9:.3f} GFLOP/step -> {format_rate(achieved)}; measured peak "
        f"{format_rate(peak['peak_flops_per_s'])} ({peak['peak_source']}) -> MFU {100 * result['mfu']:.1f}%"
    )
    if memory:
        mib = 1 << 20
        print(
            f"peak memory {memory['peak_memory_bytes'] / mib:.1f} MiB per device (XLA memory analysis: arguments "
            f"{memory['argument_bytes'] / mib:.1f} + outputs {memory['output_bytes'] / mib:.1f} + temporaries "
            f"{memory['temp_bytes'] / mib:.1f} - donated {memory['alias_bytes'] / mib:.1f} MiB)"
        )
    if args.profile:
        error, prof = m["profile_error"], None
        if error is None:
            try:
                prof = common.top_ops(args.profile)
            except Exception as e:  # noqa: BLE001 - an unreadable trace: one line; the timing stands
                error = f"{type(e).__name__}: {e}"
        if error is not None:
            result["profile_error"] = error
            print(f"profile failed, timing kept: {error}")
        else:
            result["profile"] = prof
            print(f"top ops of one profiled window ({prof['timelines']}, {prof['total_s'] * 1e3:.2f} ms in all):")
            for op in prof["ops"]:
                print(
                    f"  {op['total_s'] * 1e3:9.3f} ms {100 * op['share']:5.1f} %  x{op['calls']:<4d} {op['name'][:90]}"
                )
    if flax_modules is not None:
        images, labels = random_batch(k * n, size, args.num_classes)
        f = measure_flax_step(
            *flax_modules,
            model=args.model,
            width=width,
            dtype=args.dtype,
            num_classes=args.num_classes,
            devices=devices,
            images=images,
            labels=labels,
            repeats=args.repeats,
            warmup=args.warmup,
            count_flops=True,
            in_flight=in_flight,
        )
        fstats = common.summarize(f["times"])
        flax_ips = k * n / fstats["median_s"]
        result.update(
            peer="flax",
            flax_dir=os.path.abspath(args.flax_dir),
            flax_compile_s=f["compile_s"],
            **common.time_fields(fstats, "flax_step_time"),
            flax_images_per_second=flax_ips,
            flax_flops_per_step=f["step_flops"],
            flax_loss=f["loss"],
            ratio_lbsgd_to_flax=ips / flax_ips,
        )
        print(
            f"flax examples/imagenet train_step (pmap over {layout.num_devices} device(s), batch {k * n}): "
            f"step {_ms(fstats)}: {flax_ips:.1f} images/s; compile {f['compile_s']:.1f} s; "
            f"{f['step_flops'] / 1e9:.3f} GFLOP/step"
        )
        print(f"lbsgd/flax images/s: {ips / flax_ips:.2f}")
    common.write_json(args.json, result)
    return 0
