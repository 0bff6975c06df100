"""Tests of data.py's COCO rasteriser, Cityscapes, empty splits and check_dataset (to merge into test_all.py)."""
import json
import shutil
import warnings

import numpy as np
import pycocotools.mask as coco_mask  # installed by .ci/run: the reference our masks must equal
import pytest
import torch
from PIL import Image
from pycocotools import _mask as coco_mask_c  # frPoly: the polygon rasteriser alone, for any vertex count

import data
from test_all import blocks, make_ade, make_coco, make_voc, rle_counts, write_cifar, write_jpeg, write_png


# ----------------------------------------------------------------------------- COCO polygons

def decode(rle):
    """pycocotools' decode as bool, without its DeprecationWarning under NumPy 2 (copy=False in __array__)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


def random_polygon(rng, h, w):
    """One polygon of a random kind: [x1, y1, ...] (the kinds are the rasteriser's corner cases)."""
    kind = rng.integers(8)
    k = int(rng.integers(3, 40))
    if kind == 0:  # star-shaped, like an object outline, maybe partly off the image
        centre, radius = rng.uniform(-0.2, 1.2, 2) * (w, h), rng.uniform(0.5, 0.7 * max(h, w))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = radius * rng.uniform(0.2, 1, k)
        points = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
    elif kind == 1:  # arbitrary, self-intersecting vertices
        points = rng.uniform(-0.3, 1.3, (k, 2)) * (w, h)
    elif kind == 2:  # tiny: within a pixel or two
        points = rng.uniform(0, 1, 2) * (w, h) + rng.uniform(0, 2, (k % 5 + 1, 2))
    elif kind == 3:  # integer and half-integer vertices: ties of the rounding on the 5× grid
        points = np.round(rng.uniform(-2, 1.1, (k, 2)) * (w, h) * 2) / 2
    elif kind == 4:  # degenerate: fewer than 3 points
        points = rng.uniform(-0.1, 1.1, (int(rng.integers(1, 3)), 2)) * (w, h)
    elif kind == 5:  # zero area: collinear points, or one point repeated
        a, b = rng.uniform(0, 1, (2, 2)) * (w, h)
        points = a + rng.uniform(0, 1, (k, 1)) * (b - a) * (rng.random() < 0.7)
    elif kind == 6:  # all outside the image, on one side
        side = rng.integers(4)
        points = rng.uniform(0, 1, (k, 2)) * (w, h)
        axis = side % 2
        points[:, axis] = -1 - rng.uniform(0, 20, k) if side < 2 else (1 + rng.uniform(0, 1, k)) * (w, h)[axis]
    else:  # an axis-aligned box, maybe with fractional corners
        x0, y0 = rng.uniform(-0.2, 1, 2) * (w, h)
        x1, y1 = x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)
        points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return points.ravel().tolist()


def test_polygon_masks_equal_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(400):
        h, w = (int(v) for v in rng.integers(1, 80 if trial % 4 else 500, 2))
        parts = [random_polygon(rng, h, w) for _ in range(int(rng.integers(1, 4)))]
        for polygon in parts:  # each part alone, through pycocotools' polygon → RLE, whatever its length
            expected = decode(coco_mask_c.frPoly([polygon], h, w))[:, :, 0]
            assert np.array_equal(data.segmentation_mask([polygon], h, w), expected), (h, w, polygon)
        if all(len(p) > 4 for p in parts):  # several parts: the union, as annToMask merges them
            expected = decode(coco_mask.merge(coco_mask.frPyObjects(parts, h, w)))
            assert np.array_equal(data.segmentation_mask(parts, h, w), expected), (h, w, parts)


def test_polygon_edge_cases():
    square = [5, 5, 45, 5, 45, 35, 5, 35]  # a pixel is in when its centre is: columns 5..44, rows 5..34
    expected = np.zeros((50, 60), bool)
    expected[5:35, 5:45] = True
    assert np.array_equal(data.segmentation_mask([square], 50, 60), expected)
    assert np.array_equal(data.segmentation_mask([square + [7]], 50, 60), expected)  # odd count: last ignored
    assert not data.segmentation_mask([], 50, 60).any() and not data.segmentation_mask([[]], 50, 60).any()
    covering = [-100, -100, 500, -100, 500, 500, -100, 500]
    assert data.segmentation_mask([covering], 50, 60).all()
    for bad in ([0, 0, float("nan"), 3, 4, 4], [0, 0, 1e9, 0, 5, 5]):  # damaged, not a polygon: no huge walk
        with pytest.raises(ValueError):
            data.segmentation_mask([bad], 50, 60)


def test_rle_decoding_equals_pycocotools():
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        mask = rng.random((h, w)) < rng.uniform(0, 1)
        if rng.random() < 0.5:  # long runs as well as speckle
            mask = np.repeat(np.repeat(mask[::4, ::4], 4, 0), 4, 1)[:h, :w]
            h, w = mask.shape
        compressed = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        string = {"size": [h, w], "counts": compressed["counts"].decode()}  # as stored in the JSON
        counts = {"size": [h, w], "counts": rle_counts(mask)}  # iscrowd annotations: a list of run lengths
        assert np.array_equal(decode(coco_mask.frPyObjects(counts, h, w)), mask)
        assert np.array_equal(data.segmentation_mask(string, h, w), mask)
        assert np.array_equal(data.segmentation_mask(counts, h, w), mask)


def test_coco_labels_equal_pycocotools_and_cache_follows_the_rasteriser(tmp_path, monkeypatch):
    make_coco(tmp_path)
    annotations = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    dataset = data.get_dataset("coco", tmp_path, "train", mode="val")
    for index, image_id in enumerate((1, 2)):  # the released code's label: the first object keeps its pixels
        expected = np.zeros((50, 60), np.int64)
        for a in annotations["annotations"]:
            if a["image_id"] == image_id and a["category_id"] in data.VOC_CLASS_OF_COCO:
                segmentation = a["segmentation"]  # pycocotools' annToRLE, then decode
                if isinstance(segmentation, list):
                    rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, 50, 60))
                elif isinstance(segmentation["counts"], list):
                    rle = coco_mask.frPyObjects(segmentation, 50, 60)
                else:
                    rle = segmentation
                mask = decode(rle)
                expected[mask & (expected == 0)] = data.VOC_CLASS_OF_COCO[a["category_id"]]
        assert torch.equal(dataset[index][1], torch.from_numpy(expected))

    cache = tmp_path / "annotations" / "encnet_voc_index_train2017.json"
    stored = json.loads(cache.read_text())
    assert stored["ids"] == [1, 2] and stored["rasteriser"] == data.coco_label_version()
    cache.write_text(json.dumps({**stored, "ids": [2]}))
    assert len(data.get_dataset("coco", tmp_path, "train")) == 1  # same code, same file: believed
    monkeypatch.setattr(data, "coco_label_version", lambda: "another rasteriser")
    assert len(data.get_dataset("coco", tmp_path, "train")) == 2  # recomputed
    assert json.loads(cache.read_text())["rasteriser"] == "another rasteriser"
    cache.write_text(json.dumps({"annotation_bytes": stored["annotation_bytes"], "ids": [2]}))  # older format
    assert len(data.get_dataset("coco", tmp_path, "train")) == 2


# ----------------------------------------------------------------------------- Cityscapes

def write_rgb_png(path, w, h, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(path)


CITYSCAPES_CITIES = {"train": ["aachen", "bremen"], "val": ["frankfurt"], "test": ["berlin"]}


def cityscapes_ids(w=34, h=4):
    """h×w labelIds label holding every id 0..33 (stripes one pixel wide)."""
    return np.resize(np.arange(34), w)[None].repeat(h, 0)


def make_cityscapes(root, per_city=2, train_ids=False):
    """The download's layout: leftImg8bit/SPLIT/CITY/*_leftImg8bit.png, gtFine/SPLIT/CITY/*_gtFine_*.png."""
    for split, cities in CITYSCAPES_CITIES.items():
        for c, city in enumerate(cities):
            for i in range(per_city):
                stem = f"{city}_{c:06d}_{i:06d}"
                write_rgb_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 34, 4, i)
                labels = root / "gtFine" / split / city
                ids = cityscapes_ids() if split != "test" else np.zeros((4, 34))  # test labels: all unlabeled
                write_png(labels / f"{stem}_gtFine_labelIds.png", ids)
                write_png(labels / f"{stem}_gtFine_color.png", ids)  # the download's other files: not labels
                (labels / f"{stem}_gtFine_polygons.json").write_text("{}")
                if train_ids:
                    write_png(labels / f"{stem}_gtFine_labelTrainIds.png", blocks(34, 4, (0, 18, 255)))
    return root


def test_cityscapes_label_ids_map_to_the_19_classes(tmp_path):
    make_cityscapes(tmp_path / "cityscapes")
    for root in (tmp_path, tmp_path / "cityscapes"):  # the parent or the folder itself
        train = data.get_dataset("cityscapes", root, "train", mode="val")
        assert len(train) == 4 and train.num_classes == 19 and train.classes[0] == "road"
        assert train.classes[18] == "bicycle" and len(train.palette) == 19
    expected = np.full(34, -1)
    expected[data.CITYSCAPES_LABEL_IDS] = np.arange(19)  # 7 road, 8 sidewalk, ..., 33 bicycle; others ignored
    image, label = train[3]
    assert image.shape == (3, 4, 34) and image.dtype == torch.uint8
    assert torch.equal(label, torch.from_numpy(expected[cityscapes_ids()]))
    assert str(train.samples[3][1]).endswith("bremen/bremen_000001_000001_gtFine_labelIds.png")
    assert len(data.get_dataset("cityscapes", tmp_path, "train+val")) == 6
    test = data.get_dataset("cityscapes", tmp_path, "test")
    assert test.mode == "val" and (test[0][1] == -1).all()
    assert data.get_dataset("cityscapes", tmp_path, "train", crop_size=8, base_size=34)[0][0].shape == (3, 8, 8)

    table = json.loads((data.Path(data.__file__).with_name("classes.json")).read_text())["cityscapes"]
    assert table["label_ids"] == data.CITYSCAPES_LABEL_IDS and data.dataset_info("cityscapes")["num_classes"] == 19
    classes = np.array([[0, 18, -1], [7, 13, 10]])  # road, bicycle, ignore; traffic sign, car, sky
    ids = data.train_ids_to_label_ids(classes)
    assert ids.dtype == np.uint8 and ids.tolist() == [[7, 33, 0], [20, 26, 23]]
    assert torch.equal(data.train_ids_to_label_ids(torch.from_numpy(classes)), torch.from_numpy(ids))
    assert np.array_equal(expected[data.train_ids_to_label_ids(np.arange(19))], np.arange(19))  # round trip


def test_cityscapes_prefers_train_ids(tmp_path):
    make_cityscapes(tmp_path, train_ids=True)
    train = data.get_dataset("cityscapes", tmp_path, "train", mode="val")
    assert str(train.samples[0][1]).endswith("_gtFine_labelTrainIds.png")
    assert torch.equal(train[0][1], torch.from_numpy(blocks(34, 4, (0, 18, -1))))  # 255 → ignore
    write_png(tmp_path / "gtFine/train/aachen/aachen_000000_000000_gtFine_labelTrainIds.png", blocks(34, 4, (19,)))
    with pytest.raises(data.DataError, match="aachen_000000_000000_gtFine_labelTrainIds.png.*value 19.*0..18, 255"):
        train[0]
    # some images lack them: the label ids of the download are read for all
    (tmp_path / "gtFine/train/bremen/bremen_000001_000001_gtFine_labelTrainIds.png").unlink()
    train = data.get_dataset("cityscapes", tmp_path, "train", mode="val")
    assert all(str(label).endswith("_gtFine_labelIds.png") for _, label in train.samples)


def test_cityscapes_errors_name_the_file(tmp_path):
    with pytest.raises(data.DataError, match="nowhere.*expected ROOT/leftImg8bit/SPLIT/CITY"):
        data.get_dataset("cityscapes", tmp_path / "nowhere", "train")
    make_cityscapes(tmp_path)
    labels = tmp_path / "gtFine" / "train" / "aachen"
    write_png(labels / "aachen_000000_000000_gtFine_labelIds.png", blocks(35, 4, (7,)))
    write_png(labels / "aachen_000000_000001_gtFine_labelIds.png", blocks(34, 4, (7, 34)))
    train = data.get_dataset("cityscapes", tmp_path, "train", mode="val")
    with pytest.raises(data.DataError, match=r"aachen_000000_000000_gtFine_labelIds.png.*35×4.*34×4"):
        train[0]
    with pytest.raises(data.DataError, match="000001_gtFine_labelIds.png: label value 34, legal values are 0..33$"):
        train[1]

    (labels / "aachen_000000_000001_gtFine_labelIds.png").unlink()
    with pytest.raises(data.DataError, match="aachen_000000_000001_gtFine_labelIds.png not found.*leftImg8bit"):
        data.get_dataset("cityscapes", tmp_path, "train")
    write_png(labels / "aachen_000000_000001_gtFine_labelIds.png", cityscapes_ids())
    write_png(labels / "aachen_000000_000007_gtFine_labelIds.png", cityscapes_ids())  # a label without image
    with pytest.raises(data.DataError, match="aachen_000000_000007_gtFine_labelIds.png has no image"):
        data.get_dataset("cityscapes", tmp_path, "train")
    (labels / "aachen_000000_000007_gtFine_labelIds.png").unlink()
    (tmp_path / "gtFine" / "train" / "ulm").mkdir()  # a city of labels without images
    with pytest.raises(data.DataError, match="gtFine/train/ulm have no images"):
        data.get_dataset("cityscapes", tmp_path, "train")
    shutil.rmtree(tmp_path / "leftImg8bit" / "val" / "frankfurt")
    shutil.rmtree(tmp_path / "gtFine" / "val" / "frankfurt")
    with pytest.raises(data.DataError, match="no images.*leftImg8bit/val"):
        data.get_dataset("cityscapes", tmp_path, "val")
    with pytest.raises(ValueError, match="train, val, test"):
        data.get_dataset("cityscapes", tmp_path, "train_extra")


# ----------------------------------------------------------------------------- empty splits, check_dataset

def test_empty_splits_are_data_errors_naming_the_folder_or_list(tmp_path):
    make_ade(tmp_path)
    for f in (tmp_path / "ADEChallengeData2016" / "images" / "validation").iterdir():
        f.unlink()
    with pytest.raises(data.DataError, match="no images.*images/validation"):
        data.get_dataset("ade20k", tmp_path, "val")
    make_voc(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", "val", ["a"], (0,), True)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(data.DataError, match="Segmentation/val.txt is empty"):
        data.get_dataset("pascal_voc", tmp_path, "val")
    coco = tmp_path / "coco"
    make_coco(coco)
    instances = coco / "annotations" / "instances_train2017.json"
    content = json.loads(instances.read_text())
    instances.write_text(json.dumps({**content, "annotations": content["annotations"][4:]}))  # none selected
    with pytest.raises(data.DataError, match="instances_train2017.json.*1,000 pixels"):
        data.get_dataset("coco", coco, "train")


def test_check_dataset_reports_the_first_bad_item_for_any_worker_count(tmp_path):
    make_ade(tmp_path, n=40)
    dataset = data.get_dataset("ade20k", tmp_path, "train")
    assert data.check_dataset(dataset, workers=1) == 40 and data.check_dataset(dataset, workers=64) == 40
    labels = tmp_path / "ADEChallengeData2016" / "annotations" / "training"
    images = tmp_path / "ADEChallengeData2016" / "images" / "training"
    write_png(labels / "ADE_33.png", blocks(40, 30, (151,)))
    write_png(labels / "ADE_21.png", blocks(41, 30, (1,)))
    (images / "ADE_35.jpg").write_bytes(b"not a jpeg")
    dataset = data.get_dataset("ade20k", tmp_path, "train")
    for workers in (1, 2):
        with pytest.raises(data.DataError, match=r"^\S*ADE_21.png: label is 41×30 but image \S*ADE_21.jpg is 40×30$"):
            data.check_dataset(dataset, workers=workers, chunk=4)
    write_png(labels / "ADE_21.png", blocks(40, 30, (1,)))
    with pytest.raises(data.DataError, match="ADE_33.png: label value 151"):
        data.check_dataset(dataset, workers=2)
    write_png(labels / "ADE_33.png", blocks(40, 30, (1,)))
    with pytest.raises(data.DataError, match="ADE_35.jpg: cannot read"):
        data.check_dataset(dataset, workers=2)


def test_check_dataset_accepts_every_dataset_type(tmp_path):
    make_voc(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", "val", ["a", "b"], (0, 20, 255), True)
    make_voc(tmp_path, "VOC2012", "SegmentationClassAug", "SegmentationAug", "train_aug", ["a"], (7, 255), False)
    make_voc(tmp_path, "VOC2010", "SegmentationClassContext", "SegmentationContext", "val", ["d"], (0, 59), False)
    make_coco(tmp_path / "coco")
    make_cityscapes(tmp_path / "cityscapes")
    write_cifar(tmp_path / "cifar-10-batches-py")
    for name, root, split, size in (("pascal_voc", tmp_path, "val", 2), ("pascal_aug", tmp_path, "train_aug", 1),
                                    ("pcontext", tmp_path, "val", 1), ("coco", tmp_path / "coco", "train", 2),
                                    ("cityscapes", tmp_path, "train+val+test", 8), ("cifar10", tmp_path, "val", 4)):
        assert data.check_dataset(data.get_dataset(name, root, split), workers=2, chunk=1) == size, name
    write_jpeg(tmp_path / "coco" / "train2017" / f"{2:012d}.jpg", 60, 51)  # not the annotation's size
    with pytest.raises(data.DataError, match=r"instances_train2017.json \(image id 2\): label is 60×50 but image"):
        data.check_dataset(data.get_dataset("coco", tmp_path / "coco", "train"), workers=1)
