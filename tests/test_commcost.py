"""Alpha-beta-gamma model: ring vs halving/doubling (Goyal et al. §4)."""

import math
import os
import subprocess
import sys

import pytest

from lbsgd import commcost as cc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POW2 = [2**k for k in range(1, 13)]  # 2 .. 4096


@pytest.mark.parametrize("p", POW2 + [3, 5, 6, 7, 100, 1000, 3000])
def test_steps_and_bytes_closed_forms(p):
    b = 12345.0
    ring = cc.ring_cost(p, b, 0, 0, 0)
    hd = cc.halving_doubling_cost(p, b, 0, 0, 0)
    assert ring["steps"] == 2 * (p - 1)
    assert ring["bytes_sent"] == pytest.approx(2 * (p - 1) / p * b)
    q = 2 ** int(math.floor(math.log2(p)))
    if q == p:
        assert hd["steps"] == 2 * int(math.log2(p))
        assert hd["bytes_sent"] == pytest.approx(2 * (p - 1) / p * b)
        assert hd["bytes_sent"] == pytest.approx(ring["bytes_sent"])
    else:  # pre/post step: +2 steps, +2b bytes on the critical path
        assert hd["steps"] == 2 * int(math.log2(q)) + 2
        assert hd["bytes_sent"] == pytest.approx(2 * (q - 1) / q * b + 2 * b)


def test_time_hand_computed():
    # p=4, b=1000, alpha=1, beta=0.01, gamma=0.001
    # ring: 6*1 + 1500*0.01 + 750*0.001 = 21.75 ; h/d: 4 + 15 + 0.75 = 19.75
    assert cc.ring_cost(4, 1000, 1, 0.01, 0.001)["time_s"] == pytest.approx(21.75)
    assert cc.halving_doubling_cost(4, 1000, 1, 0.01, 0.001)["time_s"] == pytest.approx(19.75)
    # p=3 (q=2): h/d = 4 steps, bytes 1000 + 2000, reduced 500 + 1000
    assert cc.halving_doubling_cost(3, 1000, 1, 0.01, 0.001)["time_s"] == pytest.approx(4 + 30 + 1.5)


def test_crossover_exists_for_defaults():
    alpha, beta, gamma = cc.model_params()
    b = cc.DEFAULT_MESSAGE_MB * cc.MIB
    # powers of two >= 4: same bytes, fewer steps -> halving/doubling wins
    for p in POW2[1:]:
        assert cc.hd_advantage(p, b, alpha, beta, gamma) > 0
    # at small p with a 100 MiB message the non-power pre/post step loses...
    assert cc.hd_advantage(3, b, alpha, beta, gamma) < 0
    # ...but for large p the ring's 2(p-1) alpha dominates everywhere
    p_star = cc.crossover(range(2, 4097), b, alpha, beta, gamma)
    assert p_star is not None and 100 < p_star < 4096
    assert all(cc.hd_advantage(p, b, alpha, beta, gamma) > 0 for p in range(p_star, 4097))
    assert cc.hd_advantage(p_star - 1, b, alpha, beta, gamma) <= 0
    # in message size: at p=1000 h/d wins below b*, the ring above it
    b_star = cc.crossover_bytes(1000, alpha, beta, gamma)
    assert 0 < b_star < math.inf
    assert cc.hd_advantage(1000, 0.5 * b_star, alpha, beta, gamma) > 0
    assert cc.hd_advantage(1000, 2 * b_star, alpha, beta, gamma) < 0
    assert cc.crossover_bytes(1024, alpha, beta, gamma) == math.inf


def _cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "lbsgd.commcost", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_png(tmp_path):
    out = tmp_path / "cost.png"
    r = _cli("--out", str(out), "--max_p", "512")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "halving_doubling" in r.stdout and "512" in r.stdout


@pytest.mark.parametrize("bad", [["--no_such_flag"], ["--message_mb", "x"], ["--max_p", "0"]])
def test_cli_bad_flag_one_line_exit_2(bad, tmp_path):
    r = _cli(*bad, "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert r.stderr.strip() and "\n" not in r.stderr.strip()
    assert not (tmp_path / "x.png").exists()
