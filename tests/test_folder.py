"""The image-folder dataset and the ImageNet augmentation (Goyal §5.1) on real JPEG/PNG files written here.

References are independent of the code under test: closed forms for crops of a linear-gradient image,
a NumPy re-implementation of fb.resnet.torch's crop sampler for the crop distribution, the sorted file
list for labels and order, solid colours for "every eval image exactly once".
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from lbsgd.data import folder, order, pipeline, preprocess

CLASSES = ("cat", "dog", "eel")  # written unsorted below; labels follow sorted names
VAL_COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (220, 40, 220)]
MEAN, STD = np.array(pipeline.IMAGENET_MEAN), np.array(pipeline.IMAGENET_STD)


def _jpeg(img, quality=95):
    return tf.io.encode_jpeg(np.asarray(img, np.uint8), quality=quality).numpy()


def gradient_image(h, w):
    """R rises linearly with x from 0 to 255, G with y; B = 128."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full((h, w), 128.0)], -1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/{eel,cat,dog}/ 8 JPEGs each of random size + one PNG; val/<class>/ 2 solid-colour JPEGs each."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in reversed(CLASSES):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(8):
            h, w = rng.integers(48, 161, size=2)
            low = rng.uniform(0, 255, size=(1, 4, 4, 3)).astype(np.float32)
            img = np.clip(tf.image.resize(low, [h, w], method="bicubic")[0].numpy(), 0, 255)
            (d / f"{i:02d}.JPG" if i == 3 else d / f"{i:02d}.jpg").write_bytes(_jpeg(img, 90))
    (root / "train" / "eel" / "zz.png").write_bytes(tf.io.encode_png(gradient_image(50, 70)).numpy())
    (root / "train" / "notes.txt").write_text("not a class")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    for j, color in enumerate(VAL_COLORS):
        d = root / "val" / CLASSES[j % 3]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"v{j}.jpg").write_bytes(_jpeg(np.broadcast_to(np.array(color, np.uint8), (90, 120, 3))))
    return str(root)


def _sorted_files(root, split):
    out = []
    for label, c in enumerate(sorted(CLASSES)):
        d = os.path.join(root, split, c)
        out += [(os.path.join(d, f), label) for f in sorted(os.listdir(d)) if f.lower().endswith((".jpg", ".png"))]
    return out


# --------------------------------------------------------------------------- the folder dataset


def test_folder_lists_classes_and_files_in_sorted_order(image_folder):
    ds = folder.load(image_folder)
    want = _sorted_files(image_folder, "train")
    assert (ds.num_classes, ds.channels, ds.train.num_examples, ds.eval.num_examples) == (3, 3, 25, 6)
    for i, (path, label) in enumerate(want):
        data, got_label = ds.train.read(tf.constant(i, tf.int64))
        with open(path, "rb") as f:
            assert data.numpy() == f.read(), path
        assert int(got_label) == label


@pytest.mark.parametrize("case", ["missing", "no_train", "no_classes", "no_eval", "extra_eval_class", "no_images"])
def test_folder_bad_layouts_fail_with_one_line(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing":
        (root / ("other" if case == "no_train" else "train")).mkdir(parents=True)
    if case not in ("missing", "no_train", "no_classes"):
        (root / "train" / "a").mkdir()
        if case != "no_images":
            (root / "train" / "a" / "x.jpg").write_bytes(_jpeg(np.zeros((8, 8, 3))))
    if case in ("extra_eval_class", "no_images"):
        (root / "validation" / ("b" if case == "extra_eval_class" else "a")).mkdir(parents=True)
    with pytest.raises(pipeline.DataError) as e:
        pipeline.load(f"folder:{root}")
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg
    assert ("train sub-folder" in msg) if case == "extra_eval_class" else ("train/<class>" in msg)


def _two_class_folder(root, size=8, per_class=1):
    """train/{a,b}/ and val/{a,b}/ with ``per_class`` grey size x size JPEGs each (0.jpg, 1.jpg, ...)."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                (root / split / c / f"{i}.jpg").write_bytes(_jpeg(np.full((size, size, 3), 40 * i)))
    return root


def test_symlinks_count_each_real_file_once_and_loops_are_not_followed(tmp_path):
    root = _two_class_folder(tmp_path / "data")
    a = root / "train" / "a"
    (a / "sub").mkdir()
    (a / "sub" / "y.jpg").write_bytes(_jpeg(np.ones((8, 8, 3))))
    (a / "loop").symlink_to(".")  # a directory loop: a/loop/loop/... is a again
    (a / "zz.jpg").symlink_to("0.jpg")  # a second name of a file already listed
    (root / "train" / "b" / "elsewhere").symlink_to(a / "sub")  # a's y.jpg, counted (as a) once
    ds = folder.load(str(root))
    paths = [ds.train.describe(i) for i in range(ds.train.num_examples)]
    real = {os.path.realpath(p) for p in paths}
    assert ds.train.num_examples == len(real) == 3 and ds.eval.num_examples == 2
    assert paths == [str(a / "0.jpg"), str(a / "sub" / "y.jpg"), str(root / "train" / "b" / "0.jpg")]
    assert [int(ds.train.read(tf.constant(i, tf.int64))[1]) for i in range(3)] == [0, 0, 1]


def test_non_utf8_file_names_are_read(tmp_path):
    """A file name that is not UTF-8 is opened by its bytes; messages show the bytes as \\xNN escapes."""
    root = _two_class_folder(tmp_path / "data")
    data = _jpeg(np.full((8, 8, 3), 99))
    with open(os.path.join(os.fsencode(root / "train" / "b"), b"caf\xe9.jpg"), "wb") as f:
        f.write(data)
    ds = folder.load(str(root))
    assert ds.train.num_examples == 3
    assert ds.train.describe(2) == str(root / "train" / "b") + "/caf\\xe9.jpg"
    image, label = ds.train.read(tf.constant(2, tf.int64))
    assert image.numpy() == data and int(label) == 1


@pytest.mark.parametrize("case", ["one_class", "one_class_with_images"])
def test_a_single_class_is_refused_in_one_line(tmp_path, case):
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "x.jpg").write_bytes(_jpeg(np.zeros((8, 8, 3))))
    if case == "one_class_with_images":
        (root / "train" / "b").mkdir()
    with pytest.raises(pipeline.DataError) as e:
        pipeline.load(f"folder:{root}")
    msg = str(e.value)
    assert "\n" not in msg and "needs at least two classes" in msg
    assert f"{str(root / 'train')!r}" in msg and f"{root / 'train'}/<class>/" in msg
    assert ("one class, 'a' in" in msg) if case == "one_class" else ("one class only, 'a' ('b' has none)" in msg)


@pytest.mark.parametrize("iterator", ["train", "eval"])
def test_images_of_another_size_than_shift_needs_name_the_sizes_and_the_fix(tmp_path, iterator):
    """'shift' (and evaluation after it) reads images as they are: 8x8 images cannot be 16x16 ones."""
    root = _two_class_folder(tmp_path / "data", per_class=2)
    ds = pipeline.load(f"folder:{root}")
    if iterator == "train":
        it = pipeline.train_iterator(
            ds, num_workers=2, per_worker_batch_size=2, seed=0, first_worker=0, num_local_workers=2,
            start_step=0, augment="shift", image_size=16,
        )  # fmt: skip
    else:
        it = pipeline.eval_iterator(
            ds, global_batch_size=4, first_slot=0, num_local_slots=4, augment="shift", image_size=16
        )
    with pytest.raises(pipeline.DataError) as e:
        next(it)
    msg = str(e.value)
    assert "\n" not in msg and "{{" not in msg and "node" not in msg
    assert msg.startswith(f"{root}/{iterator if iterator == 'train' else 'val'}/")
    assert msg.split(" of folder:", 1)[0].endswith(".jpg")
    assert "is 8x8 pixels" in msg and "--config.augment='shift'" in msg
    assert "--config.image_size=16 needs exactly 16x16" in msg and "--config.image_size=8" in msg
    assert "--config.augment=inception" in msg


# --------------------------------------------------------------------------- the pipeline on folders


def test_folder_train_batches_follow_remark4_and_are_normalised(image_folder):
    ds = pipeline.load(f"folder:{image_folder}")
    labels = [label for _, label in _sorted_files(image_folder, "train")]
    it = pipeline.train_iterator(
        ds,
        num_workers=2,
        per_worker_batch_size=4,
        seed=3,
        first_worker=0,
        num_local_workers=2,
        start_step=0,
        augment="inception",
        image_size=224,
    )
    b = next(it)
    assert b["image"].shape == (8, 224, 224, 3) and b["image"].dtype == np.float32 and b["label"].dtype == np.int32
    lo, hi = -MEAN / STD, (1 - MEAN) / STD
    assert np.all(b["image"] >= lo - 1e-5) and np.all(b["image"] <= hi + 1e-5)
    assert b["image"].std() > 0.1  # not blank
    idx = order.worker_batches(25, 2, 4, seed=3, epoch=0)[0].reshape(-1)
    np.testing.assert_array_equal(b["label"], np.asarray(labels)[idx])


def test_each_process_reads_its_share_and_gets_the_same_examples(image_folder):
    """Two processes feeding workers {0} and {1} together see exactly one process's batch of {0, 1}."""
    ds = pipeline.load(f"folder:{image_folder}")

    def batches(first, m, steps=3):
        it = pipeline.train_iterator(
            ds,
            num_workers=2,
            per_worker_batch_size=4,
            seed=1,
            first_worker=first,
            num_local_workers=m,
            start_step=2,
            augment="inception",
            image_size=32,
        )
        return [next(it) for _ in range(steps)]  # steps 2, 3 (epoch 0) and 4 (epoch 1: 25 // 8 = 3 steps/epoch)

    whole, p0, p1 = batches(0, 2), batches(0, 1), batches(1, 1)
    for w, a, b in zip(whole, p0, p1):
        np.testing.assert_array_equal(w["image"], np.concatenate([a["image"], b["image"]]))
        np.testing.assert_array_equal(w["label"], np.concatenate([a["label"], b["label"]]))


def test_eval_sees_every_image_exactly_once_across_processes(image_folder):
    ds = pipeline.load(f"folder:{image_folder}")
    seen = []
    for first in (0, 2):  # two processes, 2 of the 4 slots of each global eval batch each
        for b in pipeline.eval_iterator(
            ds, global_batch_size=4, first_slot=first, num_local_slots=2, augment="inception", image_size=64
        ):
            for img, m in zip(b["image"], b["mask"]):
                if m:
                    seen.append(tuple(np.round((img * STD + MEAN).mean((0, 1)) * 255).astype(int)))
    assert len(seen) == len(VAL_COLORS)
    for color in VAL_COLORS:
        assert sum(np.abs(np.subtract(s, color)).max() <= 4 for s in seen) == 1, color


# --------------------------------------------------------------------------- the augmentation


def _reference_crop_sizes(h_img, w_img, n, seed=0):
    """fb.resnet.torch's RandomSizedCrop sampler, in NumPy: (h, w) per draw, None for the fallback."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        for _ in range(10):
            area = rng.uniform(0.08, 1.0) * h_img * w_img
            aspect = rng.uniform(3 / 4, 4 / 3)
            w, h = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
            if rng.uniform() < 0.5:
                w, h = h, w
            if h <= h_img and w <= w_img:
                out.append((h, w))
                break
        else:
            out.append(None)
    return out


def test_crop_windows_are_in_bounds_and_distributed_as_fb_resnet_torch():
    H, W, n = 300, 400, 4000
    ds = tf.data.Dataset.range(n).map(
        lambda i: preprocess.random_crop_window(tf.constant([H, W]), tf.stack([tf.constant(7, tf.int64), i]))
    )
    win = next(iter(ds.batch(n))).numpy()
    y, x, h, w = win.T
    assert np.all((y >= 0) & (x >= 0) & (y + h <= H) & (x + w <= W) & (h >= 1) & (w >= 1))
    fallback = (h == 300) & (w == 300) & (y == 0) & (x == 50)  # the central square
    area = h * w / (H * W)
    aspect = w / h
    ok = ~fallback
    assert np.all(area[ok] >= 0.08 * 0.98) and np.all(area[ok] <= 1.0)
    assert np.all(aspect[ok] >= 0.75 * 0.98) and np.all(aspect[ok] <= 4 / 3 * 1.02)
    ref = _reference_crop_sizes(H, W, 20000)
    ref_fallback = np.mean([r is None for r in ref])
    ref_area = np.array([r[0] * r[1] / (H * W) for r in ref if r is not None])
    ref_wide = np.mean([r[1] > r[0] for r in ref if r is not None])
    assert abs(fallback.mean() - ref_fallback) < 0.02
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    np.testing.assert_allclose(np.quantile(area[ok], q), np.quantile(ref_area, q), atol=0.035)
    assert abs(np.mean(w[ok] > h[ok]) - ref_wide) < 0.04
    # Offsets are uniform over the free range: the crop centre is on average the image centre.
    assert abs(np.mean((y + h / 2)[ok]) - H / 2) < 4 and abs(np.mean((x + w / 2)[ok]) - W / 2) < 5


def _expected_gradient_crop(window, flip, size, h_img, w_img):
    """Bilinear resize (half-pixel centres) of a window of the linear gradient, in closed form."""
    y0, x0, h, w = window
    src_x = x0 + np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    src_y = y0 + np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    r = np.broadcast_to(255 * src_x / (w_img - 1), (size, size))
    g = np.broadcast_to((255 * src_y / (h_img - 1))[:, None], (size, size))
    img = np.stack([r, g, np.full((size, size), 128.0)], -1)
    return img[:, ::-1] if flip else img


@pytest.mark.parametrize("encode,tol", [("jpeg", 4.0), ("png", 0.6)])
def test_inception_crop_is_the_window_resized_and_flipped(encode, tol):
    """A JPEG is decoded inside the window only (PNG in full): either way the pixels are the window's."""
    H, W, size = 240, 320, 48
    img = gradient_image(H, W)
    data = _jpeg(img, 98) if encode == "jpeg" else tf.io.encode_png(img).numpy()
    flips = []
    for s in range(12):
        seed = tf.constant([5, s], tf.int64)
        out = preprocess.inception_crop(tf.constant(data), seed, size, 3).numpy()
        window, flip = preprocess.inception_params(tf.constant([H, W]), seed)
        want = _expected_gradient_crop(window.numpy(), bool(flip), size, H, W)
        assert out.shape == (size, size, 3) and out.dtype == np.float32
        assert np.abs(out - want).max() < tol, s  # the gradient's rounding (+ JPEG error)
        flips.append(bool(flip))
    assert 0 < sum(flips) < 12


def test_flip_happens_about_half_the_time():
    H, W = 120, 160
    data = tf.constant(_jpeg(gradient_image(H, W), 95))
    ds = tf.data.Dataset.range(400).map(
        lambda i: preprocess.inception_crop(data, tf.stack([tf.constant(11, tf.int64), i]), 16, 3)
    )
    imgs = next(iter(ds.batch(400))).numpy()
    flipped = imgs[:, :, -1, 0].mean(1) < imgs[:, :, 0, 0].mean(1)  # R falls from left to right
    assert 0.42 < flipped.mean() < 0.58


@pytest.mark.parametrize("encode,tol", [("png", 0.6), ("jpeg", 4.0)])
def test_eval_center_crop_is_deterministic_and_centred(encode, tol):
    """Shorter side 375 -> 256 (500 -> 341), central 224 x 224: the crop starts at (16, 58) of the resized image.

    Antialiased bilinear resizing keeps a linear gradient linear away from the borders, so every pixel has a
    closed form; PNG leaves only the gradient's rounding, JPEG adds its colour-conversion error.
    """
    H, W = 375, 500
    img = gradient_image(H, W)
    data = tf.constant(_jpeg(img, 98) if encode == "jpeg" else tf.io.encode_png(img).numpy())
    fn = preprocess.eval_fn("inception", 224, 3, MEAN, STD)
    a, b = fn(data).numpy(), fn(data).numpy()
    np.testing.assert_array_equal(a, b)
    pixels = (a * STD + MEAN) * 255
    sy, sx = 256 / H, 341 / W
    j, i = np.arange(224), np.arange(224)
    r = 255 * ((58 + j + 0.5) / sx - 0.5) / (W - 1)
    g = 255 * ((16 + i + 0.5) / sy - 0.5) / (H - 1)
    assert np.abs(pixels[..., 0] - r[None, :]).max() < tol
    assert np.abs(pixels[..., 1] - g[:, None]).max() < tol


# --------------------------------------------------------------------------- end to end and benchmarks


def test_folder_dataset_trains_end_to_end(image_folder, tmp_path):
    """The ImageNet config on a folder (loader, inception crops, bf16, eval) with the smallest ResNet (the
    model is not the subject: ResNet-18 and -50 are test_models.py's and test_imagenet.py's) at 64x64, k=2 x n=4
    on 2 devices, 3 steps + eval."""
    from test_imagenet import load_config

    from lbsgd import train, validate

    c = load_config("imagenet_256.py")
    c.dataset = f"folder:{image_folder}"
    c.model, c.model_width, c.image_size = "resnet4", 8, 64
    c.num_workers, c.per_worker_batch_size, c.num_devices = 2, 4, 2
    c.max_steps, c.eval_batch_size, c.log_every_steps = 3, 4, 1
    validate.check_config(c)
    res = train.train_and_evaluate(c, str(tmp_path))
    with open(tmp_path / "results.json") as f:
        on_disk = json.load(f)
    assert {k: on_disk[k] for k in res} == res
    assert res["steps"] == 3 and res["global_batch_size"] == 8 and res["eval_examples"] == len(VAL_COLORS)
    assert np.isfinite(res["train_loss"]) and 0 <= res["eval_top1_error"] <= 1
    assert res["eval_top5_error"] == 0.0  # 3 classes: the true one is always in the top 5


def test_bench_input_and_step_smoke(tmp_path):
    from lbsgd.bench import cli as bench

    out = tmp_path / "input.json"
    assert (
        bench.main(
            [
                "input",
                "--num_images",
                "16",
                "--width",
                "120",
                "--height",
                "90",
                "--batch_size",
                "8",
                "--batches",
                "1",
                "--warmup",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["train_images_per_s"] > 0 and res["cores"] >= 1
    assert res["train_images_per_s_per_core"] == pytest.approx(res["train_images_per_s"] / res["cores"])
    out = tmp_path / "step.json"
    assert (
        bench.main(
            [
                "step",
                "--model",
                "resnet4",
                "--per_worker_batch_size",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["images_per_second"] > 0 and res["step_flops"] > 0 and res["image_size"] == 32
