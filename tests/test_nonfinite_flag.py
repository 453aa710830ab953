"""The step's non-finite flag: one reduction over every gradient entry, exact for any single bad entry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbsgd.trainer.step import nonfinite_flag


def _grads():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
        "bn": {"scale": jnp.ones(8, jnp.float32), "bias": jnp.zeros(8, jnp.float32)},
        "fc": {"kernel": jnp.asarray(rng.normal(size=(8, 10)), jnp.float32), "bias": jnp.zeros(10, jnp.float32)},
    }


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_bad_entry_in_any_leaf_is_flagged_with_a_finite_loss(bad):
    grads = _grads()
    flag = jax.jit(nonfinite_flag)
    assert float(flag(jnp.float32(1.5), grads)) == 0.0
    leaves, treedef = jax.tree.flatten(grads)
    for i, leaf in enumerate(leaves):
        for position in (0, leaf.size // 2, leaf.size - 1):
            bent = np.array(leaf).ravel()
            bent[position] = bad
            tree = jax.tree.unflatten(treedef, [*leaves[:i], jnp.asarray(bent.reshape(leaf.shape)), *leaves[i + 1 :]])
            assert float(flag(jnp.float32(1.5), tree)) == 1.0, (i, position)


def test_a_bad_loss_is_flagged_and_huge_finite_gradients_are_not():
    """Σ g² of these gradients overflows float32 (each entry 3e38): a norm-based flag would fire falsely;
    Σ g·0 stays 0. And a NaN next to them is not hidden."""
    huge = jax.tree.map(lambda t: jnp.full_like(t, 3e38), _grads())
    assert not np.isfinite(sum(float(jnp.sum(jnp.square(t))) for t in jax.tree.leaves(huge)))
    assert float(nonfinite_flag(jnp.float32(0.3), huge)) == 0.0
    huge["fc"]["bias"] = huge["fc"]["bias"].at[3].set(jnp.nan)
    assert float(nonfinite_flag(jnp.float32(0.3), huge)) == 1.0
    for loss in (jnp.nan, jnp.inf):
        assert float(nonfinite_flag(jnp.float32(loss), _grads())) == 1.0


def test_the_compiled_flag_has_no_per_leaf_check():
    """However many leaves, the compiled flag holds at most one is-finite per reduced quantity (loss, sum)."""
    grads = {f"layer{i}": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)} for i in range(40)}
    text = jax.jit(nonfinite_flag).lower(jnp.float32(0.0), grads).compile().as_text()
    assert text.count("is-finite(") <= 2
