"""examples/flax_loop.py: a plain Flax loop with lbsgd's optax pieces trains digits, its BatchNorm is
per worker, and README's snippet is taken from it verbatim."""

import importlib.util
import pathlib
import re
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO

EXAMPLE = pathlib.Path(REPO) / "examples" / "flax_loop.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("flax_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_flax_loop_trains_digits_to_97_percent(example, capsys):
    """The whole example as written (k = 8 x n = 16, 20 epochs; here on the suite's 8 simulated devices,
    so the worker axis is sharded): >= 97 % of the 360 held-out digits."""
    accuracy = example.train()
    assert accuracy >= 0.97
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_flax_loop_batchnorm_is_per_worker(example):
    """The step's loss equals the mean of k separate forward passes, one per worker's n examples (BN over
    those n only), computed worker by worker without vmap; BN over all kn examples gives another loss."""
    state = example.create_state(steps_per_epoch=10)
    rng = np.random.default_rng(1)
    scales = np.arange(1, example.K + 1, dtype=np.float32)[:, None, None, None, None]  # workers differ
    images = jnp.asarray(rng.random((example.K, example.N, 8, 8, 1), dtype=np.float32) * scales)
    labels = jnp.asarray(rng.integers(0, 10, (example.K, example.N)))
    _, loss = example.train_step(state, images, labels)

    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def mean_loss(x, y):
        logits, _ = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())

    per_worker = np.mean([mean_loss(images[i], labels[i]) for i in range(example.K)])
    global_bn = mean_loss(images.reshape(-1, 8, 8, 1), labels.reshape(-1))
    assert float(loss) == pytest.approx(per_worker, rel=1e-5)
    assert abs(global_bn - per_worker) > 1e-3


def _snippet_regions(text):
    regions = re.findall(r"^[ ]*# --- snippet ---\n(.*?)^[ ]*# --- end snippet ---\n", text, flags=re.S | re.M)
    return [textwrap.dedent(region).strip("\n") for region in regions]


def test_readme_snippet_is_taken_from_the_example():
    """README's code under "Use the Goyal optax chain in your Flax project" is the example's marked
    regions, in order, verbatim (so the code users copy is the code the test above runs)."""
    readme = (pathlib.Path(REPO) / "README.md").read_text()
    start = readme.index("## Use the Goyal optax chain in your Flax project")
    section = readme[start : readme.find("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    regions = _snippet_regions(EXAMPLE.read_text())
    assert len(regions) == 3
    assert blocks[0].strip("\n") == "\n\n".join(regions)
    assert len(blocks[0].strip().splitlines()) <= 40
