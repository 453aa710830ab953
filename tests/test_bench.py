"""``python -m lbsgd.bench``: the command line, the JSON each subcommand writes, and the helpers by hand.

The timing tests run the real benchmark code on a stand-in model (one Dense layer, patched in for
``lbsgd.models.factory.from_config``, which ``lbsgd.trainer.build`` calls) so that every strategy's train
step compiles in a second or two; the real ResNets go through ``bench step`` in tests/test_folder.py and
``bench allreduce`` in tests/test_aggregators.py.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import numpy as np
import pytest

from lbsgd import strategies
from lbsgd.bench import cli as bench
from lbsgd.bench import common, flops, harness, hlo
from lbsgd.bench.peers import flax as flax_peer
from lbsgd.errors import PeerError
from lbsgd.models import factory as model_factory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ("allreduce", "hlo", "input", "step", "strategies", "workers")


class Linear(nn.Module):
    """Flatten -> Dense: the smallest model the train step accepts (no BN statistics)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


@pytest.fixture
def linear_model(monkeypatch):
    """Every subcommand that builds a model gets ``Linear`` (bench step/strategies/workers build their
    step with ``lbsgd.trainer.build``, which builds the model with ``lbsgd.models.factory.from_config``)."""
    monkeypatch.setattr(model_factory, "from_config", lambda config, num_classes: Linear(num_classes))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "lbsgd.bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


# -- command line --------------------------------------------------------------------------------------------


def test_subcommands_are_plain_functions_and_listed_by_help():
    assert tuple(bench.SUBCOMMANDS) == SUBCOMMANDS
    assert all(callable(f) for f in bench.SUBCOMMANDS.values())
    r = _cli("--help")
    assert r.returncode == 0 and all(name in r.stdout for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([name, "--help"])
    assert e.value.code == 0
    assert f"python -m lbsgd.bench {name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_bad_flag_is_one_line_and_exit_2(name, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([name, "--no_such_flag=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no_such_flag" in err and err.startswith(f"python -m lbsgd.bench {name}: error:")


def test_bad_flag_from_the_shell_is_one_line_and_exit_2():
    r = _cli("strategies", "--repeats=0")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--repeats" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--peer=flax", "--flax_dir=/no/such/dir"], "has no train.py and models.py"),
        (["--peer=flax"], "needs --flax_dir"),
        (["--flax_dir=/tmp"], "only used with --peer=flax"),
        (["--peer=flax", "--flax_dir=/tmp", "--model=resnet8"], "needs an ImageNet model"),
    ],
)
def test_step_peer_flags_are_checked_in_one_line(flags, message):
    r = _cli("step", *flags)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert r.stdout == ""  # refused before any work


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_workers=2", "--num_devices=2", "--in_flight=2"], "use --in_flight=1"),
        (["--in_flight=-1"], "must be >= 0"),
    ],
)
def test_step_in_flight_is_checked_in_one_line(flags, message, capsys):
    """Several steps in flight on simulated CPU devices risk the collectives hazard: refused before any work."""
    with pytest.raises(SystemExit) as e:
        bench.main(["step", "--model=resnet4", *flags])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and message in err and out == "", err


# -- helpers by hand ---------------------------------------------------------------------------------------------


def test_time_steps_waits_once_a_window_and_reports_seconds_per_step(monkeypatch):
    clock, events = [0.0], []

    def step():  # each dispatched step "takes" 1 s of the fake clock
        events.append("step")
        clock[0] += 1.0

    def wait():
        events.append("wait")
        clock[0] += 0.5  # the wait itself: 0.5 s a window

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    times = common.time_steps(step, wait, repeats=2, warmup=1, in_flight=3)
    assert events == (["step"] * 3 + ["wait"]) * 3  # 1 untimed + 2 timed windows of 3 steps
    assert times == [pytest.approx((3 * 1.0 + 0.5) / 3)] * 2
    assert common.time_steps(step, wait, repeats=1, warmup=0) == [1.5]  # in_flight 1: every step waited for
    with pytest.raises(ValueError):
        common.time_steps(step, wait, repeats=1, in_flight=0)


def _write_trace(folder, events):
    import gzip

    path = folder / "plugins" / "profile" / "run1"
    path.mkdir(parents=True)
    with gzip.open(path / "host.perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def _meta(kind, pid, name, tid=None):
    e = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
    return e if tid is None else {**e, "tid": tid}


def test_top_ops_sums_by_name_on_the_device_xla_ops_line(tmp_path):
    events = [
        _meta("process_name", 1, "/host:CPU"),
        _meta("process_name", 2, "/device:GPU:0"),
        _meta("thread_name", 2, "XLA Ops", tid=7),
        _meta("thread_name", 2, "Stream #13", tid=8),
        {"ph": "X", "pid": 1, "tid": 3, "name": "PjitFunction(step)", "dur": 9000.0},  # host: not counted
        {"ph": "X", "pid": 2, "tid": 8, "name": "kernel_a", "dur": 500.0},  # a stream: not counted beside XLA Ops
        {"ph": "X", "pid": 2, "tid": 7, "name": "fusion.1", "dur": 300.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "convolution.2", "dur": 600.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "fusion.1", "dur": 100.0},
    ]
    _write_trace(tmp_path, events)
    prof = common.top_ops(str(tmp_path))
    assert prof["timelines"] == "device XLA Ops" and prof["total_s"] == pytest.approx(1e-3)
    assert [(o["name"], o["calls"]) for o in prof["ops"]] == [("convolution.2", 1), ("fusion.1", 2)]
    assert [o["total_s"] for o in prof["ops"]] == [pytest.approx(6e-4), pytest.approx(4e-4)]
    assert [o["share"] for o in prof["ops"]] == [pytest.approx(0.6), pytest.approx(0.4)]
    assert [o["name"] for o in common.top_ops(str(tmp_path), count=1)["ops"]] == ["convolution.2"]


def test_top_ops_on_cpu_counts_xla_kernels_not_the_runtime(tmp_path):
    events = [
        _meta("process_name", 1, "/host:CPU"),
        _meta("thread_name", 1, "python", tid=1),
        _meta("thread_name", 1, "tf_XLAPjRtCpuClient/1", tid=2),
        {"ph": "X", "pid": 1, "tid": 1, "name": "$train.py:1 step", "dur": 5000.0},
        {"ph": "X", "pid": 1, "tid": 2, "name": "ThunkExecutor::Execute", "dur": 4000.0},
        {"ph": "X", "pid": 1, "tid": 2, "name": "end: fusion.3", "dur": 1.0},
        {"ph": "X", "pid": 1, "tid": 2, "name": "fusion.3", "dur": 250.0},
        {"ph": "X", "pid": 1, "tid": 2, "name": "dot.4", "dur": 750.0},
    ]
    _write_trace(tmp_path, events)
    prof = common.top_ops(str(tmp_path))
    assert prof["timelines"] == "host tf_XLA threads"
    assert [(o["name"], o["share"]) for o in prof["ops"]] == [("dot.4", 0.75), ("fusion.3", 0.25)]
    with pytest.raises(FileNotFoundError):
        common.top_ops(str(tmp_path / "nothing"))


def test_step_profile_writes_a_trace_and_lists_the_step_s_ops(tmp_path, linear_model, capsys):
    out, prof_dir = tmp_path / "step.json", tmp_path / "prof"
    argv = ["step", "--model=resnet8", "--num_workers=2", "--per_worker_batch_size=2", "--image_size=4"]
    argv += ["--repeats=1", "--peak_size=64", f"--profile={prof_dir}", f"--json={out}"]
    assert bench.main(argv) == 0
    prof = json.loads(out.read_text())["profile"]
    assert prof["trace"].startswith(str(prof_dir)) and os.path.exists(prof["trace"])
    assert prof["ops"] and prof["total_s"] > 0
    assert sum(o["share"] for o in prof["ops"]) <= 1 + 1e-9
    assert "top ops of one profiled window" in capsys.readouterr().out


def test_step_profile_that_cannot_run_keeps_the_timing(tmp_path, linear_model, monkeypatch, capsys):
    import jax

    def no_profiler(*args, **kwargs):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(jax.profiler, "trace", no_profiler)
    out = tmp_path / "step.json"
    argv = ["step", "--model=resnet8", "--per_worker_batch_size=2", "--image_size=4", "--repeats=1"]
    assert bench.main(argv + ["--peak_size=64", f"--profile={tmp_path / 'prof'}", f"--json={out}"]) == 0
    r = json.loads(out.read_text())
    assert "no profiler here" in r["profile_error"] and "profile" not in r and r["images_per_second"] > 0
    assert "profile failed, timing kept: RuntimeError: no profiler here" in capsys.readouterr().out


def test_steps_in_flight_reach_the_state_of_steps_waited_for_one_by_one(linear_model):
    """measure_step with 3 steps a window runs exactly the steps it says: 9 in flight give the loss of 9
    waited for one by one (one device, the same program and batch), and not that of 8."""
    from lbsgd.parallel import layout as layout_lib

    config = harness.bench_config("resnet8", num_workers=2, per_worker_batch_size=2, image_size=4)
    program = harness.build_program(config, layout_lib.make_layout(2, 1), num_classes=10)
    loss = {
        (w, r, f): harness.measure_step(program, num_classes=10, repeats=r, warmup=w, in_flight=f)["loss"]
        for w, r, f in ((1, 2, 3), (3, 6, 1), (2, 6, 1))
    }
    assert loss[1, 2, 3] == loss[3, 6, 1]  # 9 steps either way, bitwise
    assert loss[1, 2, 3] != loss[2, 6, 1]  # 8 steps: a different loss


def test_summarize_against_numpy():
    times = [0.5, 0.1, 0.4, 0.2, 0.9, 0.3]
    s = common.summarize(times)
    assert s["median_s"] == pytest.approx(np.median(times)) == pytest.approx(0.35)
    assert (s["min_s"], s["max_s"], s["repeats"]) == (0.1, 0.9, 6)
    q25, q75 = np.percentile(times, [25, 75])
    assert (s["q25_s"], s["q75_s"]) == (pytest.approx(q25), pytest.approx(q75))
    assert s["iqr_s"] == pytest.approx(q75 - q25) == pytest.approx(0.475 - 0.225)
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10):
        xs = list(rng.exponential(size=n))
        for q in (0, 10, 25, 50, 75, 90, 100):
            assert common.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    with pytest.raises(ValueError):
        common.summarize([])


def test_mfu_and_flop_rate_by_hand():
    achieved = common.flops_per_second(3e9, 0.5)  # 3 GFLOP in 0.5 s
    assert achieved == 6e9
    assert common.mfu(achieved, 24e9) == 0.25


def test_memory_analysis_counts_donated_buffers_once():
    class Stats:
        argument_size_in_bytes, output_size_in_bytes, temp_size_in_bytes = 100, 50, 30
        alias_size_in_bytes, generated_code_size_in_bytes = 40, 7

    class Compiled:
        def memory_analysis(self):
            return Stats()

    m = common.memory_analysis(Compiled())
    assert m["peak_memory_bytes"] == 100 + 50 + 30 - 40


def test_jaxpr_flops_by_hand():
    import jax
    import jax.numpy as jnp

    def f(a, b, x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return a @ b, y

    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 8))
    # dot: 2·3·4·5; conv: 2 · (2·6·6·8 outputs) · (3·3·3 taps each)
    assert flops.jaxpr_flops(jax.make_jaxpr(f)(a, b, x, w).jaxpr) == 2 * 3 * 4 * 5 + 2 * (2 * 6 * 6 * 8) * 27


def test_write_json_makes_folders(tmp_path, capsys):
    path = tmp_path / "a" / "b.json"
    common.write_json(str(path), {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1} and f"wrote {path}" in capsys.readouterr().out
    common.write_json(None, {"x": 1})  # no path: nothing


def test_load_flax_example_binds_its_modules_by_path_and_restores_names(tmp_path):
    ex = tmp_path / "examples" / "imagenet"
    ex.mkdir(parents=True)
    (ex / "models.py").write_text("ResNet50 = 'flax resnet'\n")
    (ex / "input_pipeline.py").write_text("NAME = 'pipeline'\n")
    (ex / "train.py").write_text("import input_pipeline\nimport models\nSEEN = models.ResNet50, input_pipeline.NAME\n")
    before = {name: sys.modules.get(name) for name in ("models", "input_pipeline")}
    train, models = flax_peer.load_flax_example(str(tmp_path))  # a whole checkout: examples/imagenet found
    assert train.SEEN == ("flax resnet", "pipeline") and models.ResNet50 == "flax resnet"
    assert {name: sys.modules.get(name) for name in before} == before
    (ex / "train.py").write_text("import no_such_module_here\n")
    with pytest.raises(PeerError, match="cannot import the Flax example.*no_such_module_here"):
        flax_peer.load_flax_example(str(ex))


# -- the subcommands' JSON (real benchmark code, stand-in model) -------------------------------------------------


def test_strategies_json_has_one_row_per_registered_strategy(tmp_path, linear_model, capsys):
    out = tmp_path / "s.json"
    # k=3: dpsgd's default topology, the ring, needs at least 3 workers.
    argv = ["strategies", "--num_workers=3", "--num_devices=3", "--per_worker_batch_size=2", "--image_size=4"]
    assert bench.main(argv + ["--repeats=2", "--warmup=0", f"--json={out}"]) == 0
    res = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in res["rows"]}
    assert [r["strategy"] for r in res["rows"]] == list(strategies.REGISTRY)
    assert rows["allreduce"]["ratio_to_allreduce"] == 1.0
    for r in res["rows"]:
        assert "error" not in r, r
        base = rows["allreduce"]["step_time_median_s"]
        assert r["ratio_to_allreduce"] == pytest.approx(r["step_time_median_s"] / base)
        assert r["step_time_min_s"] <= r["step_time_median_s"] <= r["step_time_max_s"] and r["compile_s"] > 0
    assert rows["dpsgd"]["topology"] == "ring" and rows["gossip_pull"]["topology"] == "random"
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in strategies.REGISTRY)


def test_step_json_reports_speed_flops_mfu_and_memory(tmp_path, linear_model):
    out = tmp_path / "step.json"
    k, n, size = 2, 2, 8
    argv = ["step", "--model=resnet8", f"--num_workers={k}", "--num_devices=2", f"--per_worker_batch_size={n}"]
    argv += [f"--image_size={size}", "--num_classes=10", "--dtype=float32", "--repeats=3", "--peak_size=128"]
    assert bench.main(argv + [f"--json={out}"]) == 0
    r = json.loads(out.read_text())
    # Linear on k·n = 4 images of 8·8·3: forward 2·4·192·10, weight gradient the same (no input gradient).
    assert r["flops_per_step"] == 2 * (2 * k * n * size * size * 3 * 10)
    assert r["step_flops"] == r["flops_per_step"]
    med = r["step_time_median_s"]
    assert r["step_time_min_s"] <= med <= r["step_time_max_s"] and r["step_time_iqr_s"] >= 0 and r["repeats"] == 3
    assert r["compile_s"] > 0 and r["in_flight"] == 1  # 2 simulated CPU devices: every step waited for
    assert r["images_per_second"] == pytest.approx(k * n / med, rel=1e-12)
    assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / med, rel=1e-12)
    assert r["peak_flops_per_s"] > 0 and r["peak_source"].startswith("measured")
    assert r["peak_flops_per_s"] == pytest.approx(2 * 2 * 128**3 * r["peak_matmul_chain"] / r["peak_best_s"], rel=1e-12)
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / r["peak_flops_per_s"], rel=1e-12)
    mem = r["memory_analysis"]
    assert r["peak_memory_bytes"] > 0
    counted = mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"]
    assert r["peak_memory_bytes"] == counted - mem["alias_bytes"]  # donated buffers once


def test_workers_json_reports_speed_and_memory_per_mode(tmp_path, linear_model):
    out = tmp_path / "w.json"
    argv = ["workers", "--model=resnet8", "--image_size=4", "--per_worker_batch_size=2", "--workers=1,2"]
    assert bench.main(argv + ["--repeats=1", "--dtype=float32", f"--json={out}"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["m"] for r in rows] == [1, 2]
    for r in rows:
        for mode in ("vmap", "accumulate", "one_bn"):
            assert r[mode] > 0 and r[f"{mode}_peak_memory_bytes"] > 0
    assert rows[0]["accumulate"] == rows[0]["vmap"]  # one worker: nothing to accumulate


@pytest.mark.skipif(not os.environ.get("LBSGD_FLAX_DIR"), reason="set LBSGD_FLAX_DIR to a google/flax checkout")
def test_step_against_the_flax_example(tmp_path):
    """Slow (two ResNet-18 compiles, ~1-2 min on a CPU); runs only with LBSGD_FLAX_DIR set."""
    out = tmp_path / "peer.json"
    argv = ["step", "--model=resnet18", "--model_width=8", "--image_size=32", "--num_classes=10", "--dtype=float32"]
    argv += ["--per_worker_batch_size=2", "--repeats=2", "--peer=flax", f"--flax_dir={os.environ['LBSGD_FLAX_DIR']}"]
    assert bench.main(argv + [f"--json={out}"]) == 0
    r = json.loads(out.read_text())
    assert r["flax_flops_per_step"] == r["flops_per_step"]  # the same ResNet v1.5, the same batch
    assert r["ratio_lbsgd_to_flax"] == pytest.approx(r["images_per_second"] / r["flax_images_per_second"])


def test_hlo_counts_by_hand():
    """The entry computation's ops of a hand-written module; is-finite counted in every computation."""
    text = """HloModule m
%fused (p: f32[4]) -> pred[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %f = pred[4]{0} is-finite(%p)
}

ENTRY %main (a: f32[4], b: f32[4]) -> (f32[4], pred[4]) {
  %a = f32[4]{0} parameter(0)
  %b = f32[4]{0} parameter(1)
  %c = f32[4]{0} copy(%a)
  %s = f32[4]{0} fusion(%c, %b), kind=kLoop, calls=%x
  %g = pred[4]{0} fusion(%s), kind=kLoop, calls=%fused
  ROOT %t = (f32[4]{0}, pred[4]{0}) tuple(%s, %g)
}
"""
    got = hlo.hlo_counts(text)
    assert got["entry_instructions"] == 6 and got["fusions"] == 2 and got["copies"] == 1 and got["is_finite"] == 1
    assert got["top_ops"] == {"parameter": 2, "fusion": 2, "copy": 1, "tuple": 1}


def test_hlo_of_the_step_has_no_per_leaf_finiteness_check(tmp_path):
    """The real step's non-finite flag is one reduction: at most two is-finite ops however many leaves."""
    out = tmp_path / "hlo.json"
    argv = ["hlo", "--model=resnet8", "--model_width=8", "--image_size=8", "--num_classes=10", "--dtype=float32"]
    assert bench.main(argv + ["--num_workers=2", "--per_worker_batch_size=2", f"--json={out}"]) == 0
    r = json.loads(out.read_text())["lbsgd"]
    assert 0 < r["is_finite"] <= 2 and r["entry_instructions"] > r["fusions"] > 0


@pytest.mark.skipif(not os.environ.get("LBSGD_FLAX_DIR"), reason="set LBSGD_FLAX_DIR to a google/flax checkout")
def test_hlo_within_three_percent_of_the_flax_example(tmp_path):
    """Slow (two ResNet-50 compiles); runs only with LBSGD_FLAX_DIR set."""
    out = tmp_path / "hlo.json"
    assert bench.main(["hlo", f"--flax_dir={os.environ['LBSGD_FLAX_DIR']}", f"--json={out}"]) == 0
    assert json.loads(out.read_text())["ratio"] <= 1.03
