"""Shared by every ``python -m lbsgd.bench`` subcommand: one JSON writer, host facts, timing and FLOP helpers.

Timing convention (every subcommand): a program is compiled ahead of time and that time is reported on
its own (``compile_s``); then ``warmup`` untimed calls, then ``repeats`` timed calls, each waited for
(never two steps in flight: the CPU collectives hazard). ``summarize`` turns the timed calls into the
median and the spread (min, max, quartiles, IQR).

Nothing here imports JAX at module import time, so a subcommand can still ask XLA for simulated CPU
devices (``ensure_host_devices``) before JAX starts.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np


def write_json(path: str | None, result: dict) -> None:
    """Write ``result`` as indented JSON to ``path`` (parent folders created) and say so; no-op without a path."""
    if not path:
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


def host_cores() -> int:
    """CPU cores this process may run on (the affinity mask on Linux, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ensure_host_devices(count: int = 8) -> None:
    """Ask XLA for ``count`` simulated CPU devices, if JAX is not yet imported and no count is set.

    Only CPU runs see the flag; it must be set before JAX initialises its backends.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def device_kind(device) -> str:
    """``'platform: kind'`` of a JAX device, e.g. ``'gpu: NVIDIA H100 80GB HBM3'`` or ``'cpu: cpu'``."""
    return f"{device.platform}: {device.device_kind}"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median and spread of timed repeats (seconds): median, min, max, 25th/75th percentiles, IQR, count."""
    if not times:
        raise ValueError("no timed repeats")
    q25, q75 = percentile(times, 25), percentile(times, 75)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "q25_s": q25,
        "q75_s": q75,
        "iqr_s": q75 - q25,
        "repeats": len(times),
    }


def time_fields(
    stats: dict[str, Any], prefix: str = "step_time", keys: Sequence[str] = ("median", "min", "max", "iqr")
) -> dict[str, float]:
    """``summarize``'s ``keys`` as JSON fields named ``<prefix>_<key>_s``."""
    return {f"{prefix}_{key}_s": stats[f"{key}_s"] for key in keys}


def compile_timed(jitted: Callable, *args) -> tuple[Any, float]:
    """Lower and compile a jitted (or pmapped) function for ``args`` ahead of time: ``(compiled, seconds)``."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``call()`` after ``warmup`` untimed ones.

    ``call`` must run one step and wait for its result (``jax.block_until_ready``) before returning.
    """
    for _ in range(max(warmup, 0)):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def time_steps(
    step: Callable[[], Any], wait: Callable[[], Any], repeats: int, warmup: int = 1, in_flight: int = 1
) -> list[float]:
    """Seconds per step of ``repeats`` timed windows, each ``in_flight`` calls of ``step()`` dispatched
    back to back and then one ``wait()``, after ``warmup`` untimed windows.

    ``step`` dispatches one step without waiting for it; ``wait`` blocks until the last one has finished
    (``jax.block_until_ready``). ``in_flight`` = 1 waits on every step (the per-step time; what a CPU
    with simulated devices needs: the collectives hazard); more keeps that many steps queued on the
    device, as the training loop does off CPU, so the host's dispatch hides behind the device's work.
    Each window's time is divided by ``in_flight``.
    """
    if in_flight < 1:
        raise ValueError(f"in_flight={in_flight} must be at least 1")

    def window():
        for _ in range(in_flight):
            step()
        wait()

    return [t / in_flight for t in time_calls(window, repeats=repeats, warmup=warmup)]


def top_ops(trace_dir: str, count: int = 15) -> dict[str, Any]:
    """The operations that took longest in the newest profile under ``trace_dir``, written by
    ``jax.profiler.trace(trace_dir, create_perfetto_trace=True)``.

    Complete events ('X') are summed by name over one set of timelines: on an accelerator its "XLA Ops"
    lines (else its streams, else every line of its processes, those named '/device:...'); on CPU, where
    XLA's kernels run on host threads, the threads named 'tf_XLA...' without the runtime's own scopes
    (names with '::', 'end: ' markers) — nested kernel parts can count twice there. Returns
    ``{'trace', 'timelines', 'total_s', 'ops': [{'name', 'total_s', 'calls', 'share'}, ...]}``, the ops by
    total time (at most ``count``), ``share`` of ``total_s``, the sum over every op on those timelines.
    """
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True))
    if not traces:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(traces[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    complete = [e for e in events if e.get("ph") == "X"]
    device = [e for e in complete if processes.get(e["pid"], "").startswith("/device:")]
    if device:
        lines = [threads.get((e["pid"], e["tid"]), "") for e in device]
        for timelines, keep in (
            ("device XLA Ops", lambda line: line == "XLA Ops"),
            ("device streams", lambda line: line.startswith("Stream")),
            ("device, every line", lambda line: True),
        ):
            chosen = [e for e, line in zip(device, lines) if keep(line)]
            if chosen:
                break
    else:
        timelines = "host tf_XLA threads"
        chosen = [
            e
            for e in complete
            if threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
            and "::" not in e["name"]
            and not e["name"].startswith("end: ")
        ]
    total, calls = collections.Counter(), collections.Counter()
    for e in chosen:
        total[e["name"]] += e.get("dur", 0.0) * 1e-6  # trace durations are in microseconds
        calls[e["name"]] += 1
    whole = sum(total.values())
    ops = [
        {"name": name, "total_s": t, "calls": calls[name], "share": t / whole if whole else 0.0}
        for name, t in total.most_common(count)
    ]
    return {"trace": traces[-1], "timelines": timelines, "total_s": whole, "ops": ops}


def flops_per_second(flops: float, seconds: float) -> float:
    """FLOP rate of ``flops`` done in ``seconds``."""
    return flops / seconds


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak FLOP/s of the same devices."""
    return achieved_flops_per_s / peak_flops_per_s


def memory_analysis(compiled) -> dict[str, int] | None:
    """Per-device bytes from XLA's memory analysis of a compiled program, or None where it has none.

    ``peak_memory_bytes`` = arguments + outputs + temporaries - aliased (donated inputs whose buffers the
    outputs reuse are counted once): the memory the program needs on one device while it runs.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends/versions do not implement it
        return None
    if m is None:
        return None
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["peak_memory_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled program by XLA's cost analysis (per device), or None where it reports none.

    On GPU it misses convolutions handed to cuDNN; the step benchmark reports it next to its own count.
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def default_peak_size(platform: str) -> tuple[int, int]:
    """(matrix size, chained matmuls per timed call) for ``measure_peak_flops`` on a platform."""
    if platform == "cpu":
        return 512, 4  # ~1 GFLOP per device: well under a second even on a loaded 2-core host
    return 8192, 16  # ~17.6 TFLOP per device: ~25 ms on an H100 in bfloat16, launch overhead negligible


def measure_peak_flops(devices: Sequence, dtype: str, *, size: int = 0, iters: int = 0, repeats: int = 3) -> dict:
    """Measure the peak matmul FLOP/s of ``devices`` together, in ``dtype``, in this process.

    Every device runs ``iters`` chained ``size`` x ``size`` matrix products (x <- x @ b, so none can be
    skipped) at once (``shard_map`` over the devices, the step's own default precision); the best of
    ``repeats`` timed calls after one warm-up gives ``peak_flops_per_s`` = d x iters x 2 size^3 / seconds.
    Where several "devices" share cores (simulated CPU devices) this is the peak they reach together.
    """
    # Imported here, not at module level: every subcommand imports this module before it parses its flags.
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = list(devices)
    d = len(devices)
    auto_size, auto_iters = default_peak_size(devices[0].platform)
    size, iters = size or auto_size, iters or auto_iters
    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    dt = jnp.dtype(dtype)

    def make(key):
        ka, kb = jax.random.split(key)
        a = jax.random.normal(ka, (d * size, size), jnp.float32).astype(dt)
        b = (jax.random.normal(kb, (d * size, size), jnp.float32) / math.sqrt(size)).astype(dt)  # keeps |x| ~ 1
        return a, b

    a, b = jax.jit(make, out_shardings=(sharding, sharding))(jax.random.PRNGKey(0))

    def chain(x, w):
        return jax.lax.fori_loop(0, iters, lambda _, y: y @ w, x)

    fn = jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
    compiled, _ = compile_timed(fn, a, b)
    times = time_calls(lambda: jax.block_until_ready(compiled(a, b)), repeats=repeats, warmup=1)
    best = min(times)
    flops = d * iters * 2.0 * size**3
    return {
        "peak_flops_per_s": flops / best,
        "peak_matmul_size": size,
        "peak_matmul_chain": iters,
        "peak_repeats": repeats,
        "peak_best_s": best,
        "peak_dtype": str(dt),
        "peak_devices": d,
        "peak_source": (
            f"measured: best of {repeats} calls of {iters} chained {size}x{size} {dt} matmuls on {d} device(s)"
        ),
    }
