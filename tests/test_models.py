"""ResNet v1.5 structure and Goyal §5.1 initialisation."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbsgd import train
from lbsgd.models import resnet


def _init(name, size, **kw):
    model = resnet.create_model(name, num_classes=kw.pop("num_classes", 10), **kw)
    variables = train.run_once(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    return model, variables


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name,classes,want",
    [
        ("resnet20", 10, 272_474),  # He et al. 2016 §4.2: "0.27M" (3-channel input)
        ("resnet18", 1000, 11_689_512),  # torchvision's resnet18, the same architecture
    ],
)
def test_parameter_counts_match_published_architectures(name, classes, want):
    model = resnet.create_model(name, num_classes=classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    assert _count(shapes["params"]) == want


def test_resnet4_is_the_stem_one_basic_block_and_the_classifier():
    """resnet4 (the quick plumbing model): 3x3 stem conv + BN, one basic block (two 3x3 convs + BN, identity
    shortcut), fc. Parameters in closed form for width w, c input channels, m classes."""
    w, c, m = 8, 3, 10
    model = resnet.create_model("resnet4", num_classes=m, width=w)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, c)), train=False))
    want = 9 * c * w + 2 * w + 2 * (9 * w * w + 2 * w) + (w * m + m)
    assert _count(shapes["params"]) == want
    assert sorted(shapes["params"]) == ["BasicBlock_0", "fc", "stem_bn", "stem_conv"]


def test_zero_gamma_on_the_last_bn_of_every_residual_block():
    """Goyal §5.1: γ = 0 for the last BN of each block, so every block starts as the identity."""
    _, variables = _init("resnet14", 8)
    params = flax.traverse_util.flatten_dict(variables["params"])
    blocks = sorted({k[0] for k in params if k[0].startswith("BasicBlock")})
    assert len(blocks) == 6
    for b in blocks:
        bns = sorted({k[1] for k in params if k[0] == b and k[1].startswith("BatchNorm")})
        last = bns[-1]
        assert np.all(params[(b, last, "scale")] == 0), b
        for other in bns[:-1]:
            assert np.all(params[(b, other, "scale")] == 1), (b, other)
        if (b, "proj_bn", "scale") in params:
            assert np.all(params[(b, "proj_bn", "scale")] == 1)


def test_zero_gamma_makes_blocks_identity_at_init():
    """With γ = 0 the residual branch adds nothing: a block maps x (≥ 0) to relu(x) = x."""
    block = resnet.BasicBlock(
        8, 1, conv=flax.linen.Conv, norm=lambda **kw: flax.linen.BatchNorm(use_running_average=False, **kw)
    )
    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 8)))
    variables = block.init(jax.random.PRNGKey(2), x)
    y, _ = block.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_initialisers_he_normal_convs_and_fc_std_001():
    _, variables = _init("resnet18", 32, num_classes=1000)
    params = variables["params"]
    fc = np.asarray(params["fc"]["kernel"])
    assert abs(fc.std() - 0.01) < 0.0005 and abs(fc.mean()) < 0.0005  # N(0, 0.01²), 512k samples
    assert np.all(np.asarray(params["fc"]["bias"]) == 0)
    # He et al. 2015 (fan_out): std = sqrt(2 / (kh·kw·out_channels)), truncated normal in flax.
    k = np.asarray(params["stem_conv"]["kernel"])  # 7x7x3x64
    want = np.sqrt(2.0 / (7 * 7 * 64))
    assert abs(k.std() - want) / want < 0.05


def test_stems_and_v15_stride_placement():
    model = resnet.create_model("resnet50", num_classes=7)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 64, 64, 3)), train=False), variables)
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    # v1.5: the stride of a downsampling bottleneck is on the 3x3 conv, not the first 1x1.
    block = variables["params"]["BottleneckBlock_3"]  # first block of stage 2
    assert block["Conv_1"]["kernel"].shape[:2] == (3, 3)
    small = jax.eval_shape(
        lambda: resnet.create_model("resnet8", num_classes=10).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False
        )
    )
    assert small["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 16)  # small stem: 3x3, no pool


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        resnet.create_model("resnet9", num_classes=10)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((3, 2, 2, 128), (3, 3, 128, 8), 1, "SAME"),  # 2x2 output: shifted products
        ((3, 4, 4, 128), (3, 3, 128, 8), 2, ((1, 1), (1, 1))),  # stride 2 onto 2x2
        ((3, 4, 4, 128), (1, 1, 128, 8), 2, "VALID"),  # 1x1 projection shortcut onto 2x2
        ((3, 3, 1, 128), (3, 3, 128, 5), 2, "SAME"),  # 2x1 output, non-square
        ((3, 4, 4, 128), (3, 3, 128, 8), 1, "SAME"),  # 4x4 output: XLA's convolution
        ((3, 2, 2, 64), (3, 3, 64, 8), 1, "SAME"),  # too few input channels: XLA's convolution
    ],
)
def test_small_output_convolutions_equal_xla_convolution_with_gradients(shape, kernel, stride, padding):
    """resnet.conv_general_dilated (shifted matrix products on CPU for <= 4 output positions and >= 128 input
    channels) gives XLA's convolution and its gradients, and takes the product path exactly where it should."""
    import jax
    from jax import lax

    from lbsgd.models import resnet

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=kernel) / np.sqrt(np.prod(kernel[:3])), jnp.float32)  # outputs O(1)
    dn = lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, (stride, stride), padding, dimension_numbers=dn)))

    want = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)
    got = resnet.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))  # a wrong tap: O(1)
    grads = jax.grad(loss(resnet.conv_general_dilated), (0, 1))(x, w), jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(*grads):  # float32 rounding of sums of up to 1,152 products: relative to the largest entry
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    prims = {e.primitive.name for e in jax.make_jaxpr(loss(resnet.conv_general_dilated))(x, w).jaxpr.eqns}
    products = want.shape[1] * want.shape[2] <= resnet.SMALL_CONV_POSITIONS and shape[-1] >= resnet.SMALL_CONV_MIN_CHANNELS
    assert ("conv_general_dilated" in prims) != products, prims


def test_space_to_depth_stem_is_the_same_function_of_the_same_parameters():
    """The 7x7/2 stem as a 4x4/1 convolution on a 2x2 space-to-depth input: the same parameters (a checkpoint
    of one loads into the other), outputs and gradients within float32 rounding of the standard stem, for
    random weights and even and odd image sizes."""
    import numpy as np

    conv = ("NHWC", "HWIO", "NHWC")
    for size in (32, 33, 8):  # the stem alone against lax's own strided convolution
        x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3))
        kernel = jax.random.normal(jax.random.PRNGKey(7), (7, 7, 3, 8))
        want = jax.lax.conv_general_dilated(x, kernel, (2, 2), [(3, 3), (3, 3)], dimension_numbers=conv)
        got = resnet.SpaceToDepthStem(8).apply({"params": {"kernel": kernel}}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 33, 33, 3))
    std, s2d = (resnet.ResNet((1,), "basic", num_classes=10, stem=stem, width=8) for stem in ("imagenet", "space_to_depth"))
    v_std, v_s2d = std.init(jax.random.PRNGKey(0), x, train=False), s2d.init(jax.random.PRNGKey(0), x, train=False)
    assert jax.tree.structure(v_std) == jax.tree.structure(v_s2d)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), v_std, v_s2d)))
    # random weights everywhere (zero-gamma would hide the block), then the network and its gradient
    leaves, tree = jax.tree.flatten(v_std["params"])
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    r = jax.random.normal(jax.random.PRNGKey(3), (2, 10))

    def logits_of(model, p):  # running statistics: train-mode BN over 2 images would amplify rounding
        return model.apply({"params": p, "batch_stats": v_std["batch_stats"]}, x, train=False)

    want_logits = logits_of(std, params)
    np.testing.assert_allclose(logits_of(s2d, params), want_logits, atol=1e-4 * float(jnp.max(jnp.abs(want_logits))))
    g_std, g_s2d = (jax.grad(lambda p, m=m: jnp.sum(logits_of(m, p) * r))(params) for m in (std, s2d))
    for a, b in zip(jax.tree.leaves(g_s2d), jax.tree.leaves(g_std)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * float(jnp.max(jnp.abs(b))))
