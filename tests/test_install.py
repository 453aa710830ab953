"""The light install: ``pip install lbsgd`` (no extras) is jax, flax, optax and numpy, and the optax
pieces, the models and the strategies' pure parts import and run without the trainer's stack."""

import configparser
import os
import pathlib
import subprocess
import sys
import textwrap

from conftest import REPO

TRAINER_STACK = ("tensorflow", "tensorflow_datasets", "clu", "orbax", "sklearn", "matplotlib", "ml_collections")

# Runs in a fresh interpreter with every trainer-stack package made unimportable.
PROBE = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {TRAINER_STACK!r}:
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, Block())

    import jax, jax.numpy as jnp, optax
    import lbsgd.costmodel, lbsgd.noise_scale, lbsgd.parallel, lbsgd.strategies
    from lbsgd.models import resnet
    from lbsgd.optim import goyal_schedule, goyal_sgd

    model = resnet.create_model("resnet4", num_classes=10, width=8)
    x = jnp.ones((4, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    tx = goyal_sgd(goyal_schedule(0.1, 4, steps_per_epoch=10, num_epochs=1, decay="none"))
    opt_state = tx.init(variables["params"])

    def loss(p):
        logits, _ = model.apply(dict(variables, params=p), x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4)).mean()

    grads = jax.grad(loss)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    new = optax.apply_updates(variables["params"], updates)
    assert loss(new) < loss(variables["params"])
    assert sorted(lbsgd.strategies.REGISTRY)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {TRAINER_STACK!r})
    print("trainer stack loaded:", loaded)
    """
)


def test_light_install_requires_no_trainer_stack():
    """setup.cfg's install_requires is jax, flax, optax and numpy; the rest is in the [train] extra."""
    config = configparser.ConfigParser()
    config.read(pathlib.Path(REPO) / "setup.cfg")
    names = lambda text: {line.split(";")[0].split(">")[0].split("[")[0].strip() for line in text.split("\n") if line.strip()}
    assert names(config["options"]["install_requires"]) == {"jax", "flax", "optax", "numpy"}
    train = names(config["options.extras_require"]["train"])
    assert {"tensorflow-cpu", "tensorflow-datasets", "clu", "orbax-checkpoint", "scikit-learn", "ml-collections"} <= train
    assert "lbsgd[train]" in config["options.extras_require"]["test"]


def test_optim_models_and_strategies_work_without_the_trainer_stack():
    """With TensorFlow, TFDS, clu, orbax, scikit-learn, matplotlib and ml-collections unimportable, the
    optax chain takes a step that lowers a ResNet's loss and every strategy registers."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("trainer stack loaded: []")


def test_tools_on_the_light_install_say_what_to_install_in_one_line():
    """lbsgd.main, sweep, compare and bench without the trainer's packages: one line naming the missing
    packages and the install command, exit status 2 (not an ImportError traceback)."""
    block = "import sys; sys.modules['tensorflow'] = sys.modules['ml_collections'] = None; import runpy; "
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    for tool, args in [("lbsgd.main", "['--config=experiments/digits.py']"), ("lbsgd.sweep", "['--config=experiments/digits.py', '--grid=num_workers=1,2']"),
                       ("lbsgd.bench", "['step']")]:
        code = block + f"sys.argv = ['{tool}'] + {args}; runpy.run_module('{tool}', run_name='__main__')"
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (tool, done.stderr[-1500:])
        assert "(ml_collections, tensorflow)" in lines[0] and "pip install 'lbsgd[train]'" in lines[0], lines[0]
