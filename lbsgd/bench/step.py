"""``python -m lbsgd.bench step``: speed of the real train step, its FLOPs, MFU and memory.

The step is the one a run trains with (``lbsgd.trainer.build`` through ``lbsgd.bench.harness``: forward
per worker, loss / kn, gradient, allreduce, Goyal's optimizer update) for one model on random inputs,
k workers x n images over d devices. Reported:

* ``compile_s``: ahead-of-time compilation, apart from the timed steps;
* ``step_time_*``: median and spread (min, max, quartiles, IQR) over ``--repeats`` timed windows (after
  ``--warmup`` untimed ones) of seconds per step; a window is ``--in_flight`` steps dispatched back to
  back and then waited for (1 on CPU: every step waited for; 4 on an accelerator, where the training loop
  does not wait on each step either); ``images_per_second`` = kn / median;
* ``flops_per_step``: model FLOPs, 2 x the multiply-adds of every convolution and matrix product in the
  step's jaxpr (``lbsgd.bench.flops.jaxpr_flops``; XLA's own count, ``xla_flops_per_device_step``, is shown
  beside it);
* ``achieved_flops_per_s`` = flops_per_step / median; ``peak_flops_per_s``: *measured* here, on the same
  devices and in the step's dtype (``common.measure_peak_flops``: chained large matmuls, best of a few);
  ``mfu`` = achieved / peak;
* ``peak_memory_bytes``: per device, from XLA's memory analysis of the compiled step (arguments +
  outputs + temporaries - donated buffers the outputs reuse).

``--peer=flax --flax_dir=PATH`` also times the Flax ImageNet example's own ``train_step``
(``lbsgd.bench.peers.flax``) on the same model, batch and devices in the same run, and prints lbsgd's
images/s over Flax's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from lbsgd import cli
from lbsgd.bench import common
from lbsgd.bench.peers import flax as flax_peer
from lbsgd.errors import PeerError

#: Steps a timed window keeps in flight off CPU by default: the training loop does not wait on each step
#: there, so the host dispatches the next step while the device runs this one.
IN_FLIGHT_OFF_CPU = 4


@dataclasses.dataclass
class Setting:
    """What the flags resolve to once JAX has started: the layout, image size, model width, steps in
    flight, and the Flax example's ``(train, models)`` modules with ``--peer=flax`` (else None)."""

    layout: Any
    image_size: int
    width: int
    in_flight: int
    flax_modules: tuple | None = None


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


# --------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------


#: The compute dtypes training accepts (``lbsgd.config.schema.DTYPES``; float16 is refused there: no loss
#: scaling). Spelled out, not imported: the schema imports JAX, which must not start before the flags.
DTYPES = ("float32", "bfloat16")
EXAMPLES = (
    "python -m lbsgd.bench step --model=resnet8 --model_width=16 --image_size=8 --num_classes=10 --dtype=float32",
    "python -m lbsgd.bench step --model=resnet50 --num_workers=8 --per_worker_batch_size=32 --num_devices=8 "
    "--json=step.json",
    "python -m lbsgd.bench step --model=resnet50 --per_worker_batch_size=32 --peer=flax --flax_dir=$HOME/flax",
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``bench step``."""
    ap = cli.ArgumentParser(
        prog="python -m lbsgd.bench step",
        description="Throughput, MFU and memory of lbsgd.train's train step (k workers x n images) on random inputs.",
        examples=EXAMPLES,
    )
    ap.add_argument("--model", default="resnet50", help="a ResNet of lbsgd.models.resnet (resnet4 ... resnet152)")
    ap.add_argument("--model_width", type=int, default=0, help="channels of the first stage (default 0: the model's)")
    ap.add_argument(
        "--image_size",
        type=cli.positive(int),
        default=None,
        help="input size in pixels (default: 224 for ImageNet models, 32 for small-image ones)",
    )
    ap.add_argument("--num_classes", type=cli.positive(int), default=1000, help="classes of the random labels")
    ap.add_argument("--num_workers", type=cli.positive(int), default=1, help="k, workers")
    ap.add_argument(
        "--per_worker_batch_size", type=cli.positive(int), default=8, help="n, images per worker (paper: 32)"
    )
    ap.add_argument("--num_devices", type=cli.positive(int), default=1, help="devices to spread the k workers over")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype (parameters stay float32)")
    ap.add_argument("--aggregation", default="psum", help="allreduce's sum: psum | ring | halving_doubling")
    ap.add_argument(
        "--model_stem",
        default="",
        choices=("", "imagenet", "space_to_depth", "small"),
        help="the model's first layers (default '': the model's own)",
    )
    ap.add_argument("--steps_per_dispatch", type=cli.positive(int), default=1, help="steps a call runs on the device")
    ap.add_argument("--repeats", type=cli.positive(int), default=5, help="timed windows")
    ap.add_argument("--warmup", type=int, default=1, help="untimed windows after compiling")
    ap.add_argument(
        "--in_flight",
        type=int,
        default=0,
        help=f"steps dispatched before each wait (default 0: 1 on CPU, {IN_FLIGHT_OFF_CPU} on an accelerator)",
    )
    ap.add_argument(
        "--peak_size", type=int, default=0, help="matrix size of the peak-FLOP/s matmul (default 0: 512 CPU, 8192 else)"
    )
    ap.add_argument("--peak_repeats", type=cli.positive(int), default=3, help="peak matmul calls; the best is taken")
    ap.add_argument("--peer", default=None, choices=("flax",), help="also time a peer's train step: 'flax'")
    ap.add_argument(
        "--flax_dir", default=None, help="a google/flax checkout (or its examples/imagenet), for --peer=flax"
    )
    ap.add_alias("--flax-dir", "--flax_dir")
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, profile one window into DIR (jax.profiler: TensorBoard, Perfetto) and print its top ops",
    )
    ap.add_argument("--json", default=None, help="write results to this path")
    return ap


def _check_peer_flags(ap: cli.ArgumentParser, args) -> None:
    """Refuse inconsistent ``--peer``/``--flax_dir`` flags in one line, before JAX starts."""
    if args.peer == "flax" and not args.flax_dir:
        ap.error("--peer=flax needs --flax_dir=PATH (a checkout of google/flax, or its examples/imagenet)")
    if args.flax_dir and args.peer != "flax":
        ap.error("--flax_dir is only used with --peer=flax")
    if args.peer == "flax" and args.model not in flax_peer.FLAX_MODELS:
        ap.error(f"--peer=flax needs an ImageNet model the Flax example has: {', '.join(flax_peer.FLAX_MODELS)}")
    if args.peer == "flax":
        try:
            flax_peer.find_flax_example(args.flax_dir)
        except PeerError as e:
            ap.error(str(e))


def resolve(ap: cli.ArgumentParser, args) -> Setting:
    """Start JAX and resolve the flags into a ``Setting``; refuses bad ones in one line (exit 2)."""
    # Imported here, not at module level: JAX must start after ensure_host_devices has set XLA_FLAGS.
    from lbsgd.models import resnet
    from lbsgd.parallel import layout as layout_lib

    if args.model not in resnet.ARCHITECTURES:
        ap.error(f"unknown --model {args.model!r}; valid: {', '.join(resnet.ARCHITECTURES)}")
    small = resnet.ARCHITECTURES[args.model][2] == "small"
    size = args.image_size or (32 if small else 224)
    width = args.model_width or (16 if small else 64)
    try:
        layout = layout_lib.make_layout(args.num_workers, args.num_devices)
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
            flax_modules = flax_peer.load_flax_example(args.flax_dir)
        except PeerError as e:
            ap.error(str(e))
    return Setting(layout=layout, image_size=size, width=width, in_flight=in_flight, flax_modules=flax_modules)


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


def run_lbsgd(args, setting: Setting) -> tuple[dict, str | None]:
    """Build lbsgd's step for the flags (``harness``), time it and measure the devices' peak:
    ``(result, profile_error)``, the JSON result and ``measure_step``'s profiler error (or None)."""
    import jax  # JAX has started by now (``resolve``); imported here to keep it off the module level

    from lbsgd.bench import harness

    layout, size, width = setting.layout, setting.image_size, setting.width
    k, n = args.num_workers, args.per_worker_batch_size
    config = harness.bench_config(
        args.model,
        num_workers=k,
        per_worker_batch_size=n,
        image_size=size,
        dtype=args.dtype,
        model_width=width,
        aggregation=args.aggregation,
        model_stem=args.model_stem,
        steps_per_dispatch=args.steps_per_dispatch,
    )
    program = harness.build_program(config, layout, num_classes=args.num_classes)
    m = harness.measure_step(
        program,
        num_classes=args.num_classes,
        repeats=args.repeats,
        warmup=args.warmup,
        count_flops=True,
        in_flight=setting.in_flight,
        profile_dir=args.profile,
    )
    stats = common.summarize(m["times"])
    med, flops = stats["median_s"], m["step_flops"]
    devices = list(layout.devices)
    peak = common.measure_peak_flops(devices, args.dtype, size=args.peak_size, repeats=args.peak_repeats)
    achieved = common.flops_per_second(flops, med)
    memory = m["memory"] or {}
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
        device_kind=common.device_kind(devices[0]),
        host_cores=common.host_cores(),
        jax_version=jax.__version__,
        compile_s=m["compile_s"],
        warmup=args.warmup,
        repeats=stats["repeats"],
        in_flight=setting.in_flight,
        model_stem=args.model_stem,
        steps_per_dispatch=args.steps_per_dispatch,
        **common.time_fields(stats, keys=("median", "min", "max", "q25", "q75", "iqr")),
        images_per_second=k * n / med,
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
    return result, m["profile_error"]


def run_flax(args, setting: Setting, result: dict) -> None:
    """Time the Flax example's step on the same model, batch and devices; add its fields to ``result``
    and print its line and the ratio of lbsgd's images/s to Flax's."""
    from lbsgd.bench import harness  # imports JAX: kept off the module level (see ``resolve``)

    k, n, size = args.num_workers, args.per_worker_batch_size, setting.image_size
    images, labels = harness.random_batch(k * n, size, args.num_classes)
    f = flax_peer.measure_flax_step(
        *setting.flax_modules,
        model=args.model,
        width=setting.width,
        dtype=args.dtype,
        num_classes=args.num_classes,
        devices=list(setting.layout.devices),
        images=images,
        labels=labels,
        repeats=args.repeats,
        warmup=args.warmup,
        count_flops=True,
        in_flight=setting.in_flight,
    )
    fstats = common.summarize(f["times"])
    flax_ips = k * n / fstats["median_s"]
    ips = result["images_per_second"]
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
        f"flax examples/imagenet train_step (pmap over {setting.layout.num_devices} device(s), batch {k * n}): "
        f"step {_ms(fstats)}: {flax_ips:.1f} images/s; compile {f['compile_s']:.1f} s; "
        f"{f['step_flops'] / 1e9:.3f} GFLOP/step"
    )
    print(f"lbsgd/flax images/s: {ips / flax_ips:.2f}")


# --------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------


def print_result(result: dict) -> None:
    """The lines of lbsgd's step: devices, setting, step time, FLOPs and MFU, memory."""
    r = result
    k, n, size = r["num_workers"], r["per_worker_batch_size"], r["image_size"]
    stats = {key: r[f"step_time_{key}"] for key in ("median_s", "min_s", "max_s", "iqr_s")}
    stats["repeats"] = r["repeats"]
    print(
        f"device kind: {r['device_kind']}; {r['devices']} device(s); host cores: {r['host_cores']}; "
        f"jax {r['jax_version']}"
    )
    print(
        f"{r['model']} (width {r['model_width']}) {size}x{size} {r['dtype']}: k={k} x n={n} = {k * n} images/step; "
        f"compile {r['compile_s']:.1f} s"
    )
    print(f"step {_ms(stats)}, {r['in_flight']} in flight: {r['images_per_second']:.1f} images/s")
    print(
        f"model FLOPs {r['flops_per_step'] / 1e9:.3f} GFLOP/step -> {format_rate(r['achieved_flops_per_s'])}; "
        f"measured peak {format_rate(r['peak_flops_per_s'])} ({r['peak_source']}) -> MFU {100 * r['mfu']:.1f}%"
    )
    memory = r["memory_analysis"]
    if memory:
        mib = 1 << 20
        print(
            f"peak memory {memory['peak_memory_bytes'] / mib:.1f} MiB per device (XLA memory analysis: arguments "
            f"{memory['argument_bytes'] / mib:.1f} + outputs {memory['output_bytes'] / mib:.1f} + temporaries "
            f"{memory['temp_bytes'] / mib:.1f} - donated {memory['alias_bytes'] / mib:.1f} MiB)"
        )


def report_profile(result: dict, profile_dir: str, error: str | None) -> None:
    """Add the profiled window's top ops (``profile``) or the reason there are none (``profile_error``)
    to ``result``, and print them; an unreadable trace is one line and keeps the timing."""
    prof = None
    if error is None:
        try:
            prof = common.top_ops(profile_dir)
        except Exception as e:  # noqa: BLE001 - an unreadable trace: one line; the timing stands
            error = f"{type(e).__name__}: {e}"
    if error is not None:
        result["profile_error"] = error
        print(f"profile failed, timing kept: {error}")
        return
    result["profile"] = prof
    print(f"top ops of one profiled window ({prof['timelines']}, {prof['total_s'] * 1e3:.2f} ms in all):")
    for op in prof["ops"]:
        print(f"  {op['total_s'] * 1e3:9.3f} ms {100 * op['share']:5.1f} %  x{op['calls']:<4d} {op['name'][:90]}")


def main(argv: Sequence[str]) -> int:
    """``python -m lbsgd.bench step``: images/s, FLOPs, MFU and memory of the real train step."""
    ap = make_parser()
    args = ap.parse_args(argv)
    _check_peer_flags(ap, args)
    if args.num_devices > 1:
        common.ensure_host_devices(args.num_devices)  # only matters on CPU, and only before JAX starts
    setting = resolve(ap, args)
    result, profile_error = run_lbsgd(args, setting)
    print_result(result)
    if args.profile:
        report_profile(result, args.profile, profile_error)
    if setting.flax_modules is not None:
        run_flax(args, setting, result)
    common.write_json(args.json, result)
    return 0
