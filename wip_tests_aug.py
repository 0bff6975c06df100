"""Tests of mmsegmentation's Cityscapes training pipeline as options of data.augment_train (issue #12)."""
import colorsys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data
from test_all import coordinate_image, make_ade
from wip_tests_data import make_cityscapes


def asarrays(*images):
    return [np.asarray(i) for i in images]


# ----------------------------------------------------------------------------- non-square crops

def test_non_square_crop_is_an_exact_crop_at_scale_one():
    image, label = coordinate_image(120, 90)
    flips = set()
    for seed in range(12):
        out, out_label = data.augment_train(image, label, np.random.default_rng(seed), (40, 64), 120,
                                            scale_range=(1, 1), max_rotation=0)
        assert out.size == out_label.size == (64, 40)  # (height 40, width 64) → PIL's (width, height)
        r, g = np.asarray(out)[0, 0, :2].astype(int)
        flipped = np.asarray(out)[0, 1, 0] < r
        source_image, source_label = (ImageOps.mirror(image), ImageOps.mirror(label)) if flipped else (image, label)
        x1 = 119 - r if flipped else r
        box = (x1, g, x1 + 64, g + 40)
        assert np.array_equal(np.asarray(out), np.asarray(source_image.crop(box)))
        assert np.array_equal(np.asarray(out_label), np.asarray(source_label.crop(box)))
        flips.add(bool(flipped))
    assert flips == {True, False}

    # a crop taller than the scaled image is padded below only, wider than it to the right only
    out, out_label = data.augment_train(image, label, np.random.default_rng(0), (100, 50), 120,
                                        scale_range=(1, 1), max_rotation=0)
    out, out_label = asarrays(out, out_label)
    assert out.shape == (100, 50, 3) and (out_label[90:] == 255).all() and (out_label[:90] < 255).all()
    assert (out[90:] == 0).all()


def test_non_square_crops_through_the_dataset(tmp_path):
    make_ade(tmp_path)  # 40×30 images
    for mode in ("train", "center"):
        image, label = data.get_dataset("ade20k", tmp_path, "train", crop_size=(16, 24), base_size=40, mode=mode)[0]
        assert image.shape == (3, 16, 24) and label.shape == (16, 24)
    image, label = data.get_dataset("ade20k", tmp_path, "train", crop_size=(16, 24), mode="val")[0]
    assert image.shape == (3, 30, 40)

    # center: scaled to just cover the crop, then its middle. A 2:1 crop of a 4:3 image keeps the full width.
    picture, plain = coordinate_image(40, 30)
    out, out_label = data.center_crop(picture, plain, (10, 20))
    box = (0, 5, 40, 25)
    assert np.array_equal(np.asarray(out), np.asarray(picture.resize((20, 10), Image.BILINEAR, box)))
    assert np.array_equal(np.asarray(out_label), np.asarray(plain.resize((20, 10), Image.NEAREST, box)))
    out, _ = data.center_crop(picture, plain, (30, 10))  # a tall crop keeps the full height
    assert out.size == (10, 30) and np.asarray(out)[:, :, 1].min() == 0 and np.asarray(out)[:, :, 1].max() >= 28


# ----------------------------------------------------------------------------- cat_max_ratio

def varied(classes, ratio):
    """mmsegmentation's rule, written out: more than one class, the largest under `ratio` of the labelled."""
    _, counts = np.unique(classes[classes >= 0], return_counts=True)
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_crop_is_varied_rule():
    assert not data.crop_is_varied(np.array([0, 0, 0, 1, -1, -1]), 0.75)  # 3/4 is not below 0.75
    assert data.crop_is_varied(np.array([0, 0, 1, -1, -1, -1]), 0.75)      # ignored pixels do not count
    assert not data.crop_is_varied(np.array([[3, 3], [-1, -1]]), 0.75)     # a single class
    assert not data.crop_is_varied(np.full(5, -1), 0.75)                  # nothing labelled


def test_cat_max_ratio_redraws_only_the_offset():
    """Replays the draws: the first of 10 checked offsets that passes, else the 11th, as mmsegmentation."""
    w, h, crop = 200, 40, 40
    raw = np.zeros((h, w), np.uint8)
    raw[:, 90:110], raw[:, 110:] = 1, 9  # class 0, a 20-column band of class 1, then raw 9 = ignored
    label = Image.fromarray(raw)
    image, _ = coordinate_image(w, h)  # R = x: the image must come from the label's window
    classes = np.arange(256)
    classes[[9, 255]] = -1
    redrawn = fallback = 0
    for seed in range(40):
        r = np.random.default_rng(seed)  # augment_train's draws: flip, long side, angle, then the offsets
        flip = r.random() < 0.5
        r.integers(w, w, endpoint=True), r.uniform(0, 0)
        offsets = []
        for _ in range(11):  # x1, then y1 (always 0: the image is as high as the crop)
            offsets.append(int(r.integers(0, w - crop, endpoint=True)))
            r.integers(0, 0, endpoint=True)
        source = raw[:, ::-1] if flip else raw
        passing = [x for x in offsets[:10] if varied(classes[source[:, x:x + crop]], 0.75)]
        x1 = passing[0] if passing else offsets[10]
        redrawn += bool(passing) and passing[0] != offsets[0]
        fallback += not passing

        out, out_label = data.augment_train(image, label, np.random.default_rng(seed), crop, w, scale_range=(1, 1),
                                            max_rotation=0, cat_max_ratio=0.75, label_classes=classes)
        out, out_label = asarrays(out, out_label)
        assert np.array_equal(out_label, source[:, x1:x1 + crop])
        columns = np.arange(w)[::-1] if flip else np.arange(w)
        assert np.array_equal(out[0, :, 0], columns[x1:x1 + crop])  # the image's window is the label's
        again = data.augment_train(image, label, np.random.default_rng(seed), crop, w, scale_range=(1, 1),
                                   max_rotation=0, cat_max_ratio=0.75, label_classes=classes)
        assert all(np.array_equal(a, b) for a, b in zip(asarrays(*again), (out, out_label)))  # deterministic
    assert redrawn >= 10 and fallback >= 1  # both branches of the rule ran


def test_cat_max_ratio_default_classes_ignore_the_fill():
    """Without label_classes every raw value but label_fill is a class; padding never counts."""
    raw = np.zeros((20, 30), np.uint8)
    raw[:, 20:] = 4  # 4 of the 7 offsets of a 24-wide window pass; counting the 4 padded rows, all 7 would

    def passing(cat_max_ratio):
        found = 0
        for seed in range(20):
            _, out_label = data.augment_train(Image.new("RGB", (30, 20)), Image.fromarray(raw),
                                              np.random.default_rng(seed), 24, 30, scale_range=(1, 1),
                                              max_rotation=0, cat_max_ratio=cat_max_ratio)
            out_label = np.asarray(out_label).astype(int)
            assert (out_label[20:] == 255).all()
            out_label[out_label == 255] = -1
            found += varied(out_label, 0.75)
        return found
    assert passing(0.75) == 20 and passing(None) < 16


# ----------------------------------------------------------------------------- photometric distortion

class ScriptedRng:
    """Stands in for np.random.Generator: returns scripted values, records the ranges asked for."""

    def __init__(self, integers=(), uniforms=()):
        self.ints, self.floats, self.calls = list(integers), list(uniforms), []

    def integers(self, low, high=None):
        self.calls.append(("integers", low, high))
        return self.ints.pop(0)

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self.floats.pop(0)


def test_photometric_identity_when_every_step_is_skipped():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    rng = ScriptedRng(integers=[0] * 5)  # brightness off, contrast last, contrast/saturation/hue off
    out = data.photometric_distortion(pixels, rng)
    assert np.array_equal(out, pixels) and out.dtype == np.uint8
    assert rng.calls == [("integers", 2, None)] * 5 and not rng.ints  # no value is drawn for a skipped step


def test_photometric_ranges_order_and_hue_units():
    red = np.array([[[255, 0, 0], [100, 50, 50]]], np.uint8)
    # every step on, contrast first (mode 1): brightness 0, contrast 1, saturation 1, hue −18 (= −36°)
    rng = ScriptedRng(integers=[1, 1, 1, 1, 1, -18], uniforms=[0.0, 1.0, 1.0])
    out = data.photometric_distortion(red, rng)
    assert rng.calls == [("integers", 2, None), ("uniform", -32, 32), ("integers", 2, None),
                         ("integers", 2, None), ("uniform", 0.5, 1.5), ("integers", 2, None), ("uniform", 0.5, 1.5),
                         ("integers", 2, None), ("integers", -18, 18)]
    assert out[0, 0].tolist() == [255, 0, 153]  # hue 0° → 324°: red plus 3/5 blue
    # contrast last (mode 0), each step truncated to uint8: 100 + 30.6 → 130, · 1.5 → 195 (rounding: 196)
    rng = ScriptedRng(integers=[1, 0, 0, 0, 1], uniforms=[30.6, 1.5])
    assert data.photometric_distortion(red, rng)[0, 1].tolist() == [195, 120, 120]
    # brightness clips at 0 and 255 before the truncation, as mmsegmentation's convert
    rng = ScriptedRng(integers=[1, 0, 0, 0, 0], uniforms=[-31.9])
    assert data.photometric_distortion(red, rng)[0].tolist() == [[223, 0, 0], [68, 18, 18]]


def hsv_step(pixels, saturation_factor=1.0, hue_shift=0.0):
    """Saturation and hue in HSV with the standard library's colorsys, pixel by pixel, rounded."""
    out = np.empty_like(pixels)
    for index in np.ndindex(pixels.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(pixels[index] / 255.0))
        rgb = colorsys.hsv_to_rgb((h + hue_shift / 360) % 1.0, min(s * saturation_factor, 1.0), v)
        out[index] = np.clip(np.rint(np.array(rgb) * 255), 0, 255)
    return out


def photometric_by_hand(pixels, rng):
    """mmsegmentation's PhotoMetricDistortion written out, with its ranges, drawing as it does."""
    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    steps = []
    if rng.integers(2):
        pixels = convert(pixels, beta=rng.uniform(-32, 32))
        steps.append("brightness")
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        pixels = convert(pixels, alpha=rng.uniform(0.5, 1.5))
        steps.append("contrast first")
    if rng.integers(2):
        pixels = hsv_step(pixels, saturation_factor=rng.uniform(0.5, 1.5))
        steps.append("saturation")
    if rng.integers(2):
        pixels = hsv_step(pixels, hue_shift=2 * rng.integers(-18, 18))  # OpenCV's 8-bit hue: 2° units
        steps.append("hue")
    if mode == 0 and rng.integers(2):
        pixels = convert(pixels, alpha=rng.uniform(0.5, 1.5))
        steps.append("contrast last")
    return pixels, steps


def test_photometric_matches_a_direct_computation():
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (6, 6, 3), np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [90, 90, 90]]  # greys: no hue
    pixels[1, :2] = [[255, 0, 0], [0, 0, 255]]
    seen = set()
    for seed in range(64):
        expected, steps = photometric_by_hand(pixels, np.random.default_rng(seed))
        out = data.photometric_distortion(pixels, np.random.default_rng(seed))
        difference = np.abs(out.astype(int) - expected)
        if not {"saturation", "hue"} & set(steps):
            assert difference.max() == 0, steps  # float32 math, clipped and truncated as mmsegmentation
        else:
            assert difference.max() <= 2 and difference.mean() < 0.1, steps  # float HSV vs colorsys' float64
        seen.update(steps)
        seen.add(len(steps))
    assert seen >= {"brightness", "contrast first", "contrast last", "saturation", "hue", 0, 4}


def test_photometric_in_augment_train_keeps_the_padding_and_follows_the_geometry():
    image, label = coordinate_image(40, 30)
    brightened = 0
    for seed in range(24):
        out, out_label = data.augment_train(image, label, np.random.default_rng(seed), 48, 40, scale_range=(1, 1),
                                            max_rotation=0, photometric=True)
        plain, plain_label = data.augment_train(image, label, np.random.default_rng(seed), 48, 40,
                                                scale_range=(1, 1), max_rotation=0)
        r = np.random.default_rng(seed)
        r.random(), r.integers(40, 40, endpoint=True), r.uniform(0, 0)  # flip, long side, angle
        r.integers(0, 0, endpoint=True), r.integers(0, 0, endpoint=True)  # the crop's offset: 48 covers 40×30
        state = r.bit_generator.state
        expected = data.photometric_distortion(np.asarray(plain), r)  # then the distortion's draws
        r.bit_generator.state = state
        brightened += bool(r.integers(2)) and r.uniform(-32, 32) > 0  # what would lift the black padding
        out = np.asarray(out)
        assert np.array_equal(np.asarray(out_label), np.asarray(plain_label))
        assert np.array_equal(out[:30, :40], expected[:30, :40])
        assert (out[30:] == 0).all() and (out[:, 40:] == 0).all()  # padding stays 0, as before normalising
    assert brightened


# ----------------------------------------------------------------------------- dataset options

def test_items_with_the_options_are_deterministic_and_worker_independent(tmp_path):
    make_cityscapes(tmp_path)  # 34×4 images, labels with every id
    options = dict(crop_size=(4, 16), base_size=34, seed=3, max_rotation=0.0, cat_max_ratio=0.75,
                   photometric=True)
    dataset = data.get_dataset("cityscapes", tmp_path, "train", **options)
    first = dataset[1]
    assert first[0].shape == (3, 4, 16) and first[1].shape == (4, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[1]))
    dataset.set_epoch(1)
    assert not torch.equal(first[0], dataset[1][0])

    def batches(workers):
        sampler = data.ShardedBatchSampler(len(dataset), 2, seed=3)
        sampler.set_epoch(1)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
        return list(loader)
    serial, parallel = batches(0), batches(2)
    assert len(serial) == 2
    for (image_a, label_a), (image_b, label_b) in zip(serial, parallel):
        assert image_a.shape == (2, 3, 4, 16) and torch.equal(image_a, image_b) and torch.equal(label_a, label_b)


def test_mmseg_cityscapes_recipe_and_option_errors(tmp_path):
    make_cityscapes(tmp_path)
    dataset = data.get_dataset("cityscapes", tmp_path, "train", **data.MMSEG_CITYSCAPES)
    image, label = dataset[0]
    assert image.shape == (3, 512, 1024) and label.shape == (512, 1024)
    assert (label >= 0).any() and (label[-1] == -1).all()  # 34×4 at ≥ 1024 wide is < 512 high: padded
    center = data.get_dataset("cityscapes", tmp_path, "val", mode="center", crop_size=(8, 16))[0][0]
    assert center.shape == (3, 8, 16)
    with pytest.raises(ValueError, match="photometric"):
        data.get_dataset("context", None, "val", 320, 320, photometric=True)
    with pytest.raises(ValueError, match="cat_max_ratio"):
        data.get_dataset("cifar10", tmp_path, "train", cat_max_ratio=0.75)
