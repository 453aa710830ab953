"""lbsgd: large-minibatch and distributed SGD in JAX/Flax, in Goyal et al.'s terms.

k workers x n examples per worker = global minibatch kn. See README.md.
"""

__version__ = "0.1.0"
