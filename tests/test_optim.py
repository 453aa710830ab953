"""Tests for lbsgd.optim against hand-computed numbers and optax's eq. (9) SGD.

Paper references are to Goyal et al. 2017 ("Accurate, Large Minibatch SGD")
unless stated otherwise.
"""

import math
import pathlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lbsgd import optim
from lbsgd.config import schema


# ImageNet-8k: 1,281,167 training images, kn = 8192, drop remainder.
IMAGENET_TRAIN = 1_281_167
KN = 8192
SPE = IMAGENET_TRAIN // KN  # 156


def _lr(schedule, step):
    return float(schedule(step))


# ---------------------------------------------------------------------------
# Linear Scaling Rule and schedule (section 2.1, 2.2)
# ---------------------------------------------------------------------------


def test_steps_per_epoch_constant():
    assert SPE == 156


def test_linear_scaling_rule():
    # Section 2.1: eta = 0.1 per 256 images -> 3.2 at kn = 8192.
    assert optim.linear_scaling(0.1, 8192) == pytest.approx(3.2)
    assert optim.linear_scaling(0.1, 256) == pytest.approx(0.1)
    assert optim.linear_scaling(0.1, 128) == pytest.approx(0.05)
    assert optim.linear_scaling(0.2, 1024, base_batch_size=512) == pytest.approx(0.4)


# (step, lr) hand-computed for eta = 0.1, kn = 8192, spe = 156, gradual 5 epochs,
# step decay at epochs 30/60/80, 90 epochs. Warmup W = 780 steps; rate during
# warmup 0.1 + 3.1 * t / 780. Boundaries at steps 4680, 9360, 12480; last
# training step 90 * 156 - 1 = 14039.
IMAGENET_TABLE = [
    (0, 0.1),
    (1, 0.1 + 3.1 / 780),
    (390, 1.65),
    (779, 0.1 + 3.1 * 779 / 780),
    (780, 3.2),
    (781, 3.2),
    (4679, 3.2),
    (4680, 0.32),
    (9359, 0.32),
    (9360, 0.032),
    (12479, 0.032),
    (12480, 0.0032),
    (14039, 0.0032),
]


@pytest.mark.parametrize("step,expected", IMAGENET_TABLE)
def test_gradual_warmup_step_decay_table(step, expected):
    # Section 2.2 gradual warmup (from eta, not from 0) + step decay.
    schedule = optim.goyal_schedule(0.1, KN, SPE)
    assert _lr(schedule, step) == pytest.approx(expected, rel=1e-5)


def test_gradual_warmup_is_linear_every_iteration():
    schedule = optim.goyal_schedule(0.1, KN, SPE)
    values = np.array([_lr(schedule, t) for t in range(0, 781)])
    np.testing.assert_allclose(np.diff(values), 3.1 / 780, rtol=1e-3)


@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.1), (389, 0.1), (779, 0.1), (780, 3.2), (4679, 3.2), (4680, 0.32), (14039, 0.0032)],
)
def test_constant_warmup(step, expected):
    schedule = optim.goyal_schedule(0.1, KN, SPE, warmup="constant")
    assert _lr(schedule, step) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("step,expected", [(0, 3.2), (1, 3.2), (779, 3.2), (4679, 3.2), (4680, 0.32)])
def test_no_warmup(step, expected):
    schedule = optim.goyal_schedule(0.1, KN, SPE, warmup="none")
    assert _lr(schedule, step) == pytest.approx(expected, rel=1e-6)


# Cosine after a 5-epoch gradual warmup: W = 780, T = 14040, T - W = 13260.
@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.1),
        (780, 3.2),
        (780 + 3315, 1.6 * (1 + math.sqrt(0.5))),  # a quarter of the way
        (780 + 6630, 1.6),  # half way
        (780 + 9945, 1.6 * (1 - math.sqrt(0.5))),  # three quarters
        (14040, 0.0),
        (20000, 0.0),
    ],
)
def test_cosine_decay(step, expected):
    schedule = optim.goyal_schedule(0.1, KN, SPE, decay="cosine")
    assert _lr(schedule, step) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_cosine_last_training_step_small_but_positive():
    schedule = optim.goyal_schedule(0.1, KN, SPE, decay="cosine")
    last = _lr(schedule, 14039)
    # 1.6 * (1 - cos(pi / 13260)) ~= 1.6 * (pi / 13260)**2 / 2 ~= 4.49e-8
    assert last == pytest.approx(1.6 * (math.pi / 13260) ** 2 / 2, rel=1e-3)


def test_no_decay():
    schedule = optim.goyal_schedule(0.1, KN, SPE, decay="none")
    assert _lr(schedule, 14039) == pytest.approx(3.2)


@pytest.mark.parametrize("warmup", ["gradual", "constant", "none"])
def test_small_batch_has_no_warmup(warmup):
    # kn = 128 <= 256: the scaled rate 0.05 from step 0, nothing to warm up.
    schedule = optim.goyal_schedule(0.1, 128, 10, warmup=warmup, warmup_epochs=5)
    for step in (0, 1, 25, 49, 50):
        assert _lr(schedule, step) == pytest.approx(0.05)
    # kn = 256 exactly: eta itself.
    schedule = optim.goyal_schedule(0.1, 256, 10, warmup=warmup)
    assert _lr(schedule, 0) == pytest.approx(0.1)


def test_fractional_decay_epochs():
    schedule = optim.goyal_schedule(0.1, 512, 10, warmup="none", decay_epochs=[1.5, 2.25], decay_factor=0.5)
    # boundaries at step 15 and at the first step at or after 22.5, i.e. 23.
    assert _lr(schedule, 14) == pytest.approx(0.2)
    assert _lr(schedule, 15) == pytest.approx(0.1)
    assert _lr(schedule, 22) == pytest.approx(0.1)
    assert _lr(schedule, 23) == pytest.approx(0.05)


def test_schedule_is_jittable():
    schedule = optim.goyal_schedule(0.1, KN, SPE)
    values = jax.jit(jax.vmap(schedule))(jnp.array([0, 780, 4680]))
    np.testing.assert_allclose(values, [0.1, 3.2, 0.32], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"warmup": "linear"}, "warmup"), ({"decay": "exp"}, "decay")],
)
def test_schedule_unknown_names(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        optim.goyal_schedule(0.1, KN, SPE, **kwargs)
    assert "\n" not in str(info.value)
    assert "valid values" in str(info.value)


# ---------------------------------------------------------------------------
# momentum_sgd: eq. (10) + Remark 2 == optax's eq. (9)
# ---------------------------------------------------------------------------

# A short schedule with every kind of rate change: kn = 1024 (k*eta = 0.4),
# 3 steps per epoch, gradual warmup over 2 epochs, decays at epochs 4 and 6.
SHORT = dict(
    base_learning_rate=0.1,
    global_batch_size=1024,
    steps_per_epoch=3,
    warmup_epochs=2,
    decay_epochs=(4, 6),
    num_epochs=8,
)
SHORT_STEPS = 24
M = 0.9


def _toy_problem():
    """Quadratic 0.5 w^T A w plus per-step gradient noise; gradient depends on w."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5)).astype(np.float32)
    a = a @ a.T / 5 + np.eye(5, dtype=np.float32)
    noise = rng.normal(size=(SHORT_STEPS, 5)).astype(np.float32)
    params = {
        "w": jnp.asarray(rng.normal(size=5), jnp.float32),
        "m": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
    }

    def grad(params, t):
        return {"w": jnp.asarray(a) @ params["w"] + noise[t], "m": params["m"] * 0.5 + t}

    return params, grad


def _trajectory(tx, steps=SHORT_STEPS):
    params, grad = _toy_problem()
    state = tx.init(params)
    out = [params]
    for t in range(steps):
        updates, state = tx.update(grad(params, t), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


@pytest.mark.parametrize("warmup", ["gradual", "constant"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_corrected_eq10_matches_optax_eq9(nesterov, warmup):
    """Remark 2: with the correction, eq. (10) follows eq. (9) through warmup and decays."""
    schedule = optim.goyal_schedule(warmup=warmup, **SHORT)
    rates = [_lr(schedule, t) for t in range(SHORT_STEPS)]
    # the short schedule really changes the rate in warmup and at both decays
    assert rates[0] == pytest.approx(0.1) and rates[6] == pytest.approx(0.4)
    assert rates[12] == pytest.approx(0.04) and rates[18] == pytest.approx(0.004)
    ours = _trajectory(optim.momentum_sgd(schedule, M, nesterov=nesterov))
    ref = _trajectory(optax.sgd(schedule, momentum=M, nesterov=nesterov))
    for t, (p, q) in enumerate(zip(ours, ref)):
        for name in p:
            np.testing.assert_allclose(p[name], q[name], rtol=1e-5, atol=1e-5, err_msg=f"step {t} leaf {name}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_uncorrected_eq10_diverges_from_eq9(nesterov):
    schedule = optim.goyal_schedule(warmup="constant", **SHORT)
    ours = _trajectory(optim.momentum_sgd(schedule, M, nesterov=nesterov, momentum_correction=False))
    ref = _trajectory(optax.sgd(schedule, momentum=M, nesterov=nesterov))
    # identical while the rate is constant (steps 0..5 -> params 0..6) ...
    for t in range(7):
        np.testing.assert_allclose(ours[t]["w"], ref[t]["w"], rtol=1e-5, atol=1e-6)
    # ... and different after the jump 0.1 -> 0.4 at step 6.
    assert not np.allclose(ours[7]["w"], ref[7]["w"], rtol=1e-3)


@pytest.mark.parametrize("nesterov", [False, True])
def test_remark2_difference_closed_form(nesterov):
    """At every rate change, uncorrected - corrected velocity = m (1 - eta_{t+1}/eta_t) v_t.

    Both variants are stepped once from the same (corrected) state, for every
    step of the short schedule; the parameter deltas then differ by minus that
    amount (times m for Nesterov, whose step is eta g + m v_{t+1}).
    """
    schedule = optim.goyal_schedule(warmup="gradual", **SHORT)
    corrected = optim.momentum_sgd(schedule, M, nesterov=nesterov)
    uncorrected = optim.momentum_sgd(schedule, M, nesterov=nesterov, momentum_correction=False)
    params, grad = _toy_problem()
    state = corrected.init(params)
    checked_changes = 0
    for t in range(SHORT_STEPS):
        g = grad(params, t)
        upd_c, state_c = corrected.update(g, state, params)
        upd_u, state_u = uncorrected.update(g, state, params)
        if t > 0:
            eta_prev, eta_next = _lr(schedule, t - 1), _lr(schedule, t)
            predicted = {k: M * (1 - eta_next / eta_prev) * np.asarray(v) for k, v in state.velocity.items()}
            factor = M if nesterov else 1.0
            for k in predicted:
                np.testing.assert_allclose(
                    state_u.velocity[k] - state_c.velocity[k], predicted[k], rtol=1e-4, atol=1e-6
                )
                np.testing.assert_allclose(upd_u[k] - upd_c[k], -factor * predicted[k], rtol=1e-4, atol=1e-6)
            if abs(eta_next - eta_prev) > 1e-6:
                checked_changes += 1
                assert np.abs(predicted["w"]).max() > 1e-4
        params = optax.apply_updates(params, upd_c)
        state = state_c
    assert checked_changes == 6 + 2  # warmup rises at steps 1..6, decays at 12, 18


def test_remark2_hand_numbers():
    # Scalar: v_t = 1 after a step at eta = 0.1; next rate 0.4, g = 0.
    # corrected v = 0.9 * 4 * 1 = 3.6; uncorrected v = 0.9; diff = 0.9 (1 - 4) = -2.7.
    schedule = lambda count: jnp.where(count == 0, 0.1, 0.4)
    for correction, expected_v in ((True, 3.6), (False, 0.9)):
        tx = optim.momentum_sgd(schedule, 0.9, momentum_correction=correction)
        state = tx.init(jnp.zeros(()))
        _, state = tx.update(jnp.asarray(10.0), state)  # v = 0.1 * 10 = 1
        assert float(state.velocity) == pytest.approx(1.0)
        upd, state = tx.update(jnp.asarray(0.0), state)
        assert float(state.velocity) == pytest.approx(expected_v)
        assert float(upd) == pytest.approx(-expected_v)


def test_constant_rate_float_learning_rate():
    # eq. (10) with a constant rate is eq. (9): compare against optax.sgd too.
    ours = _trajectory(optim.momentum_sgd(0.05, M), steps=10)
    ref = _trajectory(optax.sgd(0.05, momentum=M), steps=10)
    np.testing.assert_allclose(ours[-1]["w"], ref[-1]["w"], rtol=1e-5)


def test_first_step_and_zero_rate_are_finite():
    # Rate 0 at step 0 (warmup from zero) and at step 3, 0.1 otherwise.
    schedule = lambda count: jnp.where((count == 0) | (count == 3), 0.0, 0.1)
    for nesterov in (False, True):
        tx = optim.momentum_sgd(schedule, 0.9, nesterov=nesterov)
        params = {"w": jnp.ones(3)}
        state = tx.init(params)
        assert float(state.prev_learning_rate) == 0.0 and int(state.count) == 0
        history = []
        for t in range(6):
            g = {"w": jnp.full(3, float(t + 1))}
            upd, state = tx.update(g, state, params)
            params = optax.apply_updates(params, upd)
            history.append((np.asarray(upd["w"]), np.asarray(state.velocity["w"])))
            assert np.all(np.isfinite(params["w"]))
            assert np.all(np.isfinite(state.velocity["w"]))
        assert int(state.count) == 6
        # zero-rate steps move nothing and leave v = 0
        for t in (0, 3):
            np.testing.assert_array_equal(history[t][0], 0.0)
            np.testing.assert_array_equal(history[t][1], 0.0)
        # the step after a zero rate starts fresh: v = eta * g (ratio taken as 1)
        np.testing.assert_allclose(history[1][1], 0.1 * 2.0)
        np.testing.assert_allclose(history[4][1], 0.1 * 5.0)


def test_jit_update():
    schedule = optim.goyal_schedule(warmup="gradual", **SHORT)
    tx = optim.goyal_sgd(schedule)
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        upd, state = step(params, state, params)
        params = optax.apply_updates(params, upd)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# Weight decay mask and goyal_sgd (Remark 1)
# ---------------------------------------------------------------------------


def _flax_params():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, tokens, train=False):
            x = nn.Embed(10, 4)(tokens)
            x = nn.Conv(3, (3,))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.LayerNorm()(x)
            return nn.Dense(2)(x.mean(axis=1))

    variables = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))
    return variables["params"]


def test_weight_decay_mask_on_flax_params():
    mask = optim.weight_decay_mask(_flax_params())
    assert mask["Embed_0"] == {"embedding": True}
    assert mask["Conv_0"] == {"kernel": True, "bias": False}
    assert mask["BatchNorm_0"] == {"scale": False, "bias": False}
    assert mask["LayerNorm_0"] == {"scale": False, "bias": False}
    assert mask["Dense_0"] == {"kernel": True, "bias": False}


def test_weight_decay_mask_fallback_and_frozendict():
    from flax.core import FrozenDict

    params = {"a": {"w": jnp.ones((2, 2)), "g": jnp.ones(2), "s": jnp.ones(())}, "t": [jnp.ones((3, 3)), jnp.ones(3)]}
    mask = optim.weight_decay_mask(params)
    assert mask == {"a": {"w": True, "g": False, "s": False}, "t": [True, False]}
    # names win over ndim: a 2-D 'bias' is not decayed, a 1-D 'kernel' is.
    frozen = FrozenDict({"x": {"bias": jnp.ones((2, 2)), "kernel": jnp.ones(3)}})
    mask = optim.weight_decay_mask(frozen)
    assert mask["x"]["bias"] is False and mask["x"]["kernel"] is True


def _layered():
    w = jnp.array([[1.0, -2.0], [3.0, 0.5]])
    params = {
        "Dense_0": {"kernel": w, "bias": jnp.array([0.5, -0.5])},
        "BatchNorm_0": {"scale": jnp.array([2.0, 1.0]), "bias": jnp.array([1.0, 1.0])},
    }
    grads = {
        "Dense_0": {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "bias": jnp.array([1.0, 2.0])},
        "BatchNorm_0": {"scale": jnp.array([0.5, -0.5]), "bias": jnp.array([0.25, 0.0])},
    }
    return params, grads


@pytest.mark.parametrize("nesterov", [False, True])
def test_goyal_sgd_first_step_by_hand(nesterov):
    """Remark 1: decay is the separate term lambda w; first step v = eta (g + lambda w)."""
    eta, lam = 0.5, 0.01
    params, grads = _layered()
    tx = optim.goyal_sgd(eta, momentum=0.9, nesterov=nesterov, weight_decay=lam)
    upd, state = tx.update(grads, tx.init(params), params)
    # Nesterov first step: eta g' + m v = (1 + m) eta g'.
    f = 1.9 if nesterov else 1.0
    # kernel: g + lambda w = [[0.1 + 0.01, 0.2 - 0.02], [-0.3 + 0.03, 0.4 + 0.005]]
    np.testing.assert_allclose(upd["Dense_0"]["kernel"], -f * 0.5 * np.array([[0.11, 0.18], [-0.27, 0.405]]), rtol=1e-6)
    # biases and BN gamma/beta: no decay, just -eta g.
    np.testing.assert_allclose(upd["Dense_0"]["bias"], -f * 0.5 * np.array([1.0, 2.0]))
    np.testing.assert_allclose(upd["BatchNorm_0"]["scale"], -f * 0.5 * np.array([0.5, -0.5]))
    np.testing.assert_allclose(upd["BatchNorm_0"]["bias"], -f * 0.5 * np.array([0.25, 0.0]))


def test_goyal_sgd_mask_none_decays_everything():
    params, grads = _layered()
    tx = optim.goyal_sgd(1.0, nesterov=False, weight_decay=0.1, mask=None)
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["BatchNorm_0"]["scale"], -np.array([0.5 + 0.2, -0.5 + 0.1]))


def _first_update(tx, params, grads):
    upd, _ = tx.update(grads, tx.init(params), params)
    return upd


def test_remark1_loss_scaling_not_rate_scaling():
    """Remark 1: scaling the loss by c is not scaling eta by c once decay is on.

    Loss x c gives v = eta (c g + lambda w); rate x c gives v = c eta (g + lambda w);
    they differ by eta (c - 1) lambda w on decayed leaves.
    """
    c, eta, lam = 4.0, 0.5, 0.01
    params, grads = _layered()
    scaled_grads = jax.tree.map(lambda g: c * g, grads)
    kw = dict(nesterov=False, momentum=0.9)
    by_loss = _first_update(optim.goyal_sgd(eta, weight_decay=lam, **kw), params, scaled_grads)
    by_rate = _first_update(optim.goyal_sgd(c * eta, weight_decay=lam, **kw), params, grads)
    diff = by_loss["Dense_0"]["kernel"] - by_rate["Dense_0"]["kernel"]
    np.testing.assert_allclose(diff, eta * (c - 1) * lam * params["Dense_0"]["kernel"], rtol=1e-5)
    assert np.abs(diff).max() > 1e-3
    # undecayed leaves (bias, BN) are equivalent either way
    np.testing.assert_allclose(by_loss["BatchNorm_0"]["scale"], by_rate["BatchNorm_0"]["scale"])
    # and with weight_decay = 0 the two are the same step everywhere
    by_loss = _first_update(optim.goyal_sgd(eta, weight_decay=0.0, **kw), params, scaled_grads)
    by_rate = _first_update(optim.goyal_sgd(c * eta, weight_decay=0.0, **kw), params, grads)
    for a, b in zip(jax.tree.leaves(by_loss), jax.tree.leaves(by_rate)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ---------------------------------------------------------------------------
# LARS (You et al. 2017)
# ---------------------------------------------------------------------------


def test_lars_first_step_trust_ratio_by_hand():
    eta, lam, tc = 2.0, 0.01, 0.001
    params, grads = _layered()
    tx = optim.lars(eta, weight_decay=lam, trust_coefficient=tc, momentum=0.9)
    upd = _first_update(tx, params, grads)
    # kernel: ||w|| = sqrt(1 + 4 + 9 + 0.25) = sqrt(14.25);
    # d = g + lambda w = [[0.11, 0.18], [-0.27, 0.405]], ||d||^2 = 0.0121 + 0.0324 + 0.0729 + 0.164025
    d = np.array([[0.11, 0.18], [-0.27, 0.405]])
    norm_w, norm_d = math.sqrt(14.25), math.sqrt(0.281425)
    expected = -eta * tc * norm_w / norm_d * d
    np.testing.assert_allclose(upd["Dense_0"]["kernel"], expected, rtol=1e-5)
    # per-layer step size is trust_coefficient * lr * ||w||, independent of ||g||
    assert float(jnp.linalg.norm(upd["Dense_0"]["kernel"])) == pytest.approx(eta * tc * norm_w, rel=1e-5)
    # BN gamma/beta and biases: neither decay nor trust ratio, plain -eta g.
    np.testing.assert_allclose(upd["Dense_0"]["bias"], -eta * np.array([1.0, 2.0]))
    np.testing.assert_allclose(upd["BatchNorm_0"]["scale"], -eta * np.array([0.5, -0.5]))
    np.testing.assert_allclose(upd["BatchNorm_0"]["bias"], -eta * np.array([0.25, 0.0]))


def test_lars_step_size_ignores_gradient_scale():
    params, grads = _layered()
    tx = optim.lars(1.0, weight_decay=0.0)
    small = _first_update(tx, params, grads)
    big = _first_update(tx, params, jax.tree.map(lambda g: 1000.0 * g, grads))
    np.testing.assert_allclose(small["Dense_0"]["kernel"], big["Dense_0"]["kernel"], rtol=1e-5)
    np.testing.assert_allclose(1000.0 * small["Dense_0"]["bias"], big["Dense_0"]["bias"])


# A small pytree with two decayed layers (a dense and a conv kernel) and three
# undecayed leaves; the trust-ratio mask is written out by hand, not taken from
# weight_decay_mask.
_LARS_LAYERS = {
    ("Dense_0", "kernel"): (3, 2),
    ("Dense_0", "bias"): (2,),
    ("Conv_0", "kernel"): (3, 3, 1, 2),
    ("BatchNorm_0", "scale"): (2,),
    ("BatchNorm_0", "bias"): (2,),
}
_LARS_DECAYED = {("Dense_0", "kernel"), ("Conv_0", "kernel")}
_LARS_RATES = [1.0, 2.0, 2.0, 0.5, 0.5]  # rate changes exercise Remark 2 inside lars


def _lars_problem():
    """Initial params and per-step gradient noise; the gradient 0.5 w + c_t depends on the params."""
    rng = np.random.default_rng(7)
    params = {key: rng.normal(size=shape) for key, shape in _LARS_LAYERS.items()}
    noise = [{key: rng.normal(size=shape) for key, shape in _LARS_LAYERS.items()} for _ in _LARS_RATES]
    return params, noise


def _nest(flat):
    out = {}
    for (layer, name), value in flat.items():
        out.setdefault(layer, {})[name] = value
    return out


def _lars_run(tx):
    """Parameters after each step of ``tx`` on the toy problem (float32, through optax)."""
    flat, noise = _lars_problem()
    params = _nest({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
    state = tx.init(params)
    out = []
    for c in noise:
        c = _nest({k: jnp.asarray(v, jnp.float32) for k, v in c.items()})
        grads = jax.tree.map(lambda w, c_: 0.5 * w + c_, params, c)
        upd, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, upd)
        out.append({key: np.asarray(params[key[0]][key[1]], np.float64) for key in _LARS_LAYERS})
    return out


def _lars_numpy(form, lam, tc, m):
    """The same run by hand in float64: Algorithm 1 with the chosen trust-ratio denominator."""
    w, noise = _lars_problem()
    v = {key: np.zeros(shape) for key, shape in _LARS_LAYERS.items()}
    out, prev = [], None
    for eta, c in zip(_LARS_RATES, noise):
        ratio_m = 1.0 if prev is None else eta / prev  # Remark 2 correction (1 before the first step)
        new_w = {}
        for key in _LARS_LAYERS:
            g = 0.5 * w[key] + c[key]
            if key in _LARS_DECAYED:
                d = g + lam * w[key]
                if form == "paper":
                    denominator = np.linalg.norm(g) + lam * np.linalg.norm(w[key])
                else:
                    denominator = np.linalg.norm(d)
                d = tc * np.linalg.norm(w[key]) / denominator * d
            else:
                d = g  # biases, BN gamma/beta: plain momentum SGD
            v[key] = m * ratio_m * v[key] + eta * d
            new_w[key] = w[key] - v[key]
        w, prev = new_w, eta
        out.append(dict(w))
    return out


def _lars_tx(form, lam, tc, m):
    rates = jnp.asarray(_LARS_RATES, jnp.float32)
    return optim.lars(lambda count: rates[count], momentum=m, weight_decay=lam, trust_coefficient=tc, trust_ratio=form)


@pytest.mark.parametrize("form", ["optax", "paper"])
def test_lars_trust_ratio_forms_by_hand_over_steps(form):
    """Five steps of lars (momentum, rate changes, masked leaves) against a float64 numpy Algorithm 1.

    'paper': ratio = tc ||w|| / (||g|| + lambda ||w||) (You et al. eq. 6); 'optax': tc ||w|| / ||g + lambda w||.
    """
    lam, tc, m = 0.3, 0.05, 0.9
    got = _lars_run(_lars_tx(form, lam, tc, m))
    want = _lars_numpy(form, lam, tc, m)
    for t, (p, q) in enumerate(zip(got, want)):
        for key in _LARS_LAYERS:
            np.testing.assert_allclose(p[key], q[key], rtol=1e-5, atol=1e-6, err_msg=f"step {t} {key}")


def test_lars_paper_and_optax_forms_differ_only_with_weight_decay():
    tc, m = 0.05, 0.9
    w0, _ = _lars_problem()
    # lambda > 0: the kernels follow different paths; the paper's first step is never the longer one
    # (||g|| + lambda ||w|| >= ||g + lambda w||, triangle inequality) and is strictly shorter here.
    paper, by_optax = _lars_run(_lars_tx("paper", 0.3, tc, m)), _lars_run(_lars_tx("optax", 0.3, tc, m))
    for key in _LARS_DECAYED:
        step_paper, step_optax = np.linalg.norm(paper[0][key] - w0[key]), np.linalg.norm(by_optax[0][key] - w0[key])
        assert step_paper < 0.99 * step_optax, key
        for t in range(len(_LARS_RATES)):
            assert np.linalg.norm(paper[t][key] - by_optax[t][key]) > 1e-3 * np.linalg.norm(by_optax[t][key] - w0[key])
    for key in set(_LARS_LAYERS) - _LARS_DECAYED:  # unscaled leaves: the same plain SGD either way
        np.testing.assert_allclose(paper[-1][key], by_optax[-1][key], rtol=1e-6)
    # lambda = 0: both ratios are tc ||w|| / ||g||, the same run.
    paper, by_optax = _lars_run(_lars_tx("paper", 0.0, tc, m)), _lars_run(_lars_tx("optax", 0.0, tc, m))
    for p, q in zip(paper, by_optax):
        for key in _LARS_LAYERS:
            np.testing.assert_allclose(p[key], q[key], rtol=1e-6, atol=1e-7)


def test_paper_trust_ratio_degenerate_cases():
    """||w|| = 0: ratio 1, the step is just g (as optax's); g = 0: ratio tc ||w|| / (lambda ||w||) = tc / lambda."""
    tx = optim.scale_by_paper_trust_ratio(weight_decay=0.1, trust_coefficient=0.01)
    params = {"zero": jnp.zeros(3), "w": jnp.array([3.0, 4.0])}
    grads = {"zero": jnp.array([1.0, -2.0, 0.5]), "w": jnp.array([0.0, 0.0])}
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["zero"], [1.0, -2.0, 0.5])
    # g = 0: ratio = 0.01 * 5 / (0 + 0.1 * 5) = 0.1, d = 0.1 * (0.1 w)
    np.testing.assert_allclose(upd["w"], 0.1 * 0.1 * np.array([3.0, 4.0]), rtol=1e-6)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(params))


def test_lars_unknown_trust_ratio():
    with pytest.raises(ValueError, match="trust_ratio") as info:
        optim.lars(0.1, trust_ratio="you")
    assert "'optax', 'paper'" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# from_config
# ---------------------------------------------------------------------------


def _imagenet_config(**overrides):
    config = _config(
        dict(
            weight_decay=1e-4,
            num_workers=256,
            per_worker_batch_size=32,
            base_learning_rate=0.1,
            warmup="gradual",
            warmup_epochs=5,
            num_epochs=90,
            optimizer="goyal_sgd",
            decay="step",
            decay_epochs=(30, 60, 80),
        )
    )
    for key, value in overrides.items():
        config[key] = value
    return config


def _config(fields):
    """The schema's base config (every field at its default) with ``fields`` set."""
    config = schema.base_config()
    config.update(fields)
    return config


def test_from_config_imagenet_8k():
    tx, schedule = optim.from_config(_imagenet_config(), SPE)
    for step, expected in IMAGENET_TABLE:
        assert _lr(schedule, step) == pytest.approx(expected, rel=1e-5), step
    params, grads = _layered()
    upd = _first_update(tx, params, grads)
    # defaults: nesterov, m = 0.9, lambda = 1e-4, eta_0 = 0.1 -> (1 + m) eta (g + lambda w)
    w, g = params["Dense_0"]["kernel"], grads["Dense_0"]["kernel"]
    np.testing.assert_allclose(upd["Dense_0"]["kernel"], -1.9 * 0.1 * (g + 1e-4 * w), rtol=1e-5)


def test_from_config_supplies_no_defaults_of_its_own():
    """Every field comes from the config (the schema holds the defaults): a missing one is an error."""
    config = _imagenet_config()
    del config["decay"]
    with pytest.raises(AttributeError, match="decay"):
        optim.from_config(config, SPE)


def test_from_config_plain_object_and_sgd():
    fields = dict(num_workers=4, per_worker_batch_size=64, base_learning_rate=0.2, warmup="none", warmup_epochs=0)
    fields.update(num_epochs=2, optimizer="sgd", decay="none", nesterov=False)
    cfg = types.SimpleNamespace(**{**schema.base_config().to_dict(), **fields})  # attribute access only

    tx, schedule = optim.from_config(cfg, 10)
    assert _lr(schedule, 0) == pytest.approx(0.2)
    params, grads = _layered()
    upd = _first_update(tx, params, grads)  # no weight decay for 'sgd'
    np.testing.assert_allclose(upd["Dense_0"]["kernel"], -0.2 * grads["Dense_0"]["kernel"])


def test_from_config_digits_like_cosine():
    config = _config(
        dict(
            num_workers=8,
            per_worker_batch_size=16,
            base_learning_rate=0.1,
            warmup="gradual",
            warmup_epochs=2,
            num_epochs=30,
            optimizer="goyal_sgd",
            decay="cosine",
        )
    )
    spe = 1437 // 128  # 11
    _, schedule = optim.from_config(config, spe)
    # kn = 128 <= 256: no warmup, k*eta = 0.05, cosine over 330 steps.
    assert _lr(schedule, 0) == pytest.approx(0.05)
    assert _lr(schedule, 165) == pytest.approx(0.025, rel=1e-5)
    assert _lr(schedule, 330) == pytest.approx(0.0, abs=1e-8)


def test_from_config_lars():
    tx, _ = optim.from_config(
        _imagenet_config(optimizer="lars", warmup="none", weight_decay=0.0, nesterov=False, trust_coefficient=0.01), SPE
    )
    params, grads = _layered()
    upd = _first_update(tx, params, grads)
    # k*eta = 3.2: kernel step length = 3.2 * 0.01 * ||w||
    assert float(jnp.linalg.norm(upd["Dense_0"]["kernel"])) == pytest.approx(3.2 * 0.01 * math.sqrt(14.25), rel=1e-5)


@pytest.mark.parametrize("trust_ratio", [None, "optax", "paper"])
def test_from_config_lars_trust_ratio(trust_ratio):
    """config.lars_trust_ratio picks the denominator (default 'optax'); first kernel step by hand, lambda = 0.05."""
    overrides = dict(optimizer="lars", warmup="none", weight_decay=0.05, nesterov=False, trust_coefficient=0.01)
    if trust_ratio is not None:
        overrides["lars_trust_ratio"] = trust_ratio
    tx, _ = optim.from_config(_imagenet_config(**overrides), SPE)
    params, grads = _layered()
    upd = _first_update(tx, params, grads)
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    g = np.asarray(grads["Dense_0"]["kernel"], np.float64)
    d = g + 0.05 * w
    if trust_ratio == "paper":
        denominator = np.linalg.norm(g) + 0.05 * np.linalg.norm(w)
    else:
        denominator = np.linalg.norm(d)
    expected = -3.2 * 0.01 * np.linalg.norm(w) / denominator * d
    np.testing.assert_allclose(upd["Dense_0"]["kernel"], expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(upd["Dense_0"]["bias"], -3.2 * np.asarray(grads["Dense_0"]["bias"]), rtol=1e-6)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"optimizer": "adam"}, "config.optimizer"),
        ({"warmup": "linear"}, "config.warmup"),
        ({"decay": "poly"}, "config.decay"),
        ({"optimizer": "lars", "lars_trust_ratio": "you"}, "config.lars_trust_ratio"),
    ],
)
def test_from_config_unknown_names(overrides, field):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        optim.from_config(_imagenet_config(**overrides), SPE)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# Module hygiene
# ---------------------------------------------------------------------------


def test_pure_pieces_import_only_jax_and_optax():
    """Every module of lbsgd.optim but the config bridge (factory) needs only jax and optax (and each other)."""
    package = pathlib.Path(optim.__file__).parent
    pure = sorted(p for p in package.glob("*.py") if p.stem not in ("__init__", "factory"))
    assert {p.stem for p in pure} >= {"scaling", "schedules", "transforms"}
    for path in pure:
        imported = set(re.findall(r"^(?:import|from)\s+([\w.]+)", path.read_text(), flags=re.M))
        own = {name for name in imported if name.startswith("lbsgd")}
        assert all(name.startswith("lbsgd.optim.") and name != "lbsgd.optim.factory" for name in own), (path.name, own)
        assert imported - own <= {"__future__", "typing", "jax", "jax.numpy", "optax"}, (path.name, imported)


# --- Learning-rate scaling rules (issue #11) -----------------------------------------------------


def test_scaling_rules_at_hand_computed_points():
    assert optim.sqrt_scaling(0.1, 1024, 256) == pytest.approx(0.2)  # 0.1 * sqrt(4)
    assert optim.sqrt_scaling(0.1, 64, 256) == pytest.approx(0.05)
    assert optim.saturating_scaling(1.0, 100, 100) == pytest.approx(0.5)  # B = B_noise: half of eta_max
    assert optim.saturating_scaling(2.0, 300, 100) == pytest.approx(0.5)  # 2 / (1 + 3)
    assert optim.saturating_scaling(0.9, 50, 450) == pytest.approx(0.81)  # 0.9 / (1 + 1/9)
    # eta_max derived from the linear rule at B_noise: 0.1 * 1000 / 256, then / (1 + 1000 / 500)
    assert optim.scaled_learning_rate("saturating", 0.1, 500, 256, noise_scale=1000) == pytest.approx(0.1 * 1000 / 256 / 3)
    assert optim.scaled_learning_rate("saturating", 0.1, 500, 256, noise_scale=1000, max_learning_rate=3.0) == pytest.approx(1.0)
    assert optim.scaled_learning_rate("linear", 0.1, 8192, 256) == pytest.approx(3.2)
    assert optim.scaled_learning_rate("sqrt", 0.1, 8192, 256) == pytest.approx(0.1 * math.sqrt(32))


@pytest.mark.parametrize("b_noise", [200.0, 1000.0, 8000.0])
def test_saturating_rule_is_linear_below_and_flat_above_the_noise_scale(b_noise):
    """B << B_noise: within 5 % of the linear rule (eta_max = linear rate at B_noise); B >> B_noise:
    within 5 % of eta_max; never above either."""
    eta, base = 0.1, 256
    eta_max = optim.linear_scaling(eta, b_noise, base)
    for batch in [b_noise / 10000, b_noise / 100, b_noise / 20]:
        sat = optim.scaled_learning_rate("saturating", eta, batch, base, noise_scale=b_noise)
        assert sat == pytest.approx(optim.linear_scaling(eta, batch, base), rel=0.05)
    for batch in [20 * b_noise, 100 * b_noise, 1e4 * b_noise]:
        sat = optim.scaled_learning_rate("saturating", eta, batch, base, noise_scale=b_noise)
        assert sat == pytest.approx(eta_max, rel=0.05)
    for batch in np.geomspace(1, 1e6, 25):
        sat = optim.scaled_learning_rate("saturating", eta, batch, base, noise_scale=b_noise)
        assert sat < min(eta_max, optim.linear_scaling(eta, batch, base))


def test_schedule_uses_the_rule_for_its_peak_and_warms_up_only_to_a_higher_rate():
    kw = dict(steps_per_epoch=10, warmup="gradual", warmup_epochs=1, decay="none", num_epochs=5)
    sched = optim.goyal_schedule(0.1, 4096, scaling="saturating", noise_scale=1024, **kw)
    peak = 0.1 * 1024 / 256 / (1 + 1024 / 4096)  # 0.32
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(5)) == pytest.approx(0.1 + (peak - 0.1) / 2)
    assert float(sched(10)) == pytest.approx(peak) and float(sched(49)) == pytest.approx(peak)
    low = optim.goyal_schedule(0.1, 512, scaling="saturating", noise_scale=100, **kw)  # peak 0.0326 < eta
    assert float(low(0)) == pytest.approx(0.1 * 100 / 256 / (1 + 100 / 512))  # no warmup down to it
    sq = optim.goyal_schedule(0.1, 1024, scaling="sqrt", **kw)
    assert float(sq(10)) == pytest.approx(0.2) and float(sq(0)) == pytest.approx(0.1)


def test_from_config_scaling_rules():
    def cfg(**kw):
        c = _config(dict(num_workers=16, per_worker_batch_size=64, base_learning_rate=0.1,
                         warmup="none", warmup_epochs=0, num_epochs=1, optimizer="goyal_sgd",
                         decay="none"))
        c.update(kw)
        return c

    for c, want in [
        (cfg(), 0.4),
        (cfg(lr_scaling="sqrt"), 0.2),
        (cfg(lr_scaling="saturating", b_noise=1024.0), 0.1 * 4 / 2),
        (cfg(lr_scaling="saturating", b_noise=1024.0, lr_max=1.0), 0.5),
    ]:
        _, sched = optim.from_config(c, steps_per_epoch=10)
        assert float(sched(3)) == pytest.approx(want) and optim.peak_learning_rate(c) == pytest.approx(want)
    with pytest.raises(ValueError, match="noise scale"):
        optim.from_config(cfg(lr_scaling="saturating"), steps_per_epoch=10)
    with pytest.raises(ValueError, match="lr_scaling"):
        optim.from_config(cfg(lr_scaling="cubic"), steps_per_epoch=10)
