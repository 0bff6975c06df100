"""Test helpers and fixtures shared by test_all.py: tiny models, dataset fixtures in the real layouts, references."""
import json
import math
import os
import re
import socket
import subprocess
import sys
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import encnet
import errors
import eval as seg_eval  # `eval` shadows the builtin
import train_seg
import zoo


HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jpeg(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), np.uint8)
    Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(path, quality=90)


def write_png(path, label, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8))
    if palette:  # VOC's SegmentationClass PNGs are palette images whose indices are the classes
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    image.save(path)


def blocks(w, h, values):
    """h×w label of vertical stripes cycling through `values`."""
    return np.resize(np.repeat(np.asarray(values), 5), w)[None].repeat(h, 0)


def make_ade(root, label_values=(0, 1, 75, 150), n=3):
    for split in ("training", "validation"):
        for i in range(n):
            write_jpeg(root / "ADEChallengeData2016" / "images" / split / f"ADE_{i}.jpg", 40, 30, i)
            write_png(root / "ADEChallengeData2016" / "annotations" / split / f"ADE_{i}.png",
                      blocks(40, 30, label_values))
    return root


def make_voc(root, year, label_dir, list_dir, list_name, ids, values, palette):
    base = root / "VOCdevkit" / year
    for i in ids:
        write_jpeg(base / "JPEGImages" / f"{i}.jpg", 40, 30)
        write_png(base / label_dir / f"{i}.png", blocks(40, 30, values), palette)
    (base / "ImageSets" / list_dir).mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / list_dir / f"{list_name}.txt").write_text("\n".join(ids) + "\n")
    return root


def coordinate_image(w, h):
    """R = x, G = y: every pixel says where it came from."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x, y, (x + y) % 256], -1).astype(np.uint8)), Image.fromarray(x.astype(np.uint8))


def rle_counts(mask):
    """Run lengths of a bool mask in COCO's column-major order, starting with a background run."""
    flat = mask.T.ravel().astype(int)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def rle_string(counts):
    """pycocotools' rleToString, for the fixture."""
    chars = []
    for i, x in enumerate(counts):
        x -= counts[i - 2] if i > 2 else 0
        while True:
            c, x = x & 0x1f, x >> 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr(c + 48 + (0x20 if more else 0)))
            if not more:
                break
    return "".join(chars)


def rectangle(x0, y0, x1, y1, w=60, h=50):
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def make_coco(root):
    def image(i):
        write_jpeg(root / "train2017" / f"{i:012d}.jpg", 60, 50, i)
        return {"id": i, "file_name": f"{i:012d}.jpg", "height": 50, "width": 60}
    crowd = rectangle(30, 20, 55, 40)  # overlaps the polygon, which comes first and keeps its pixels
    annotations = [
        {"image_id": 1, "category_id": 1, "segmentation": [[5, 5, 45, 5, 45, 35, 5, 35]]},  # person → 15, 1,200 px
        {"image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": {"size": [50, 60], "counts": rle_counts(crowd)}},
        {"image_id": 1, "category_id": 90, "segmentation": [[0, 40, 20, 40, 20, 49, 0, 49]]},  # not VOC → background
        {"image_id": 2, "category_id": 3,  # car → 7, compressed RLE, 1,500 px
         "segmentation": {"size": [50, 60], "counts": rle_string(rle_counts(rectangle(10, 10, 60, 40)))}},
        {"image_id": 3, "category_id": 1, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},  # 100 px: not selected
        {"image_id": 4, "category_id": 90, "segmentation": [[0, 0, 50, 0, 50, 40, 0, 40]]},
    ]
    (root / "annotations").mkdir(parents=True)
    instances = {"images": [image(i) for i in (1, 2, 3, 4)], "annotations": annotations}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(instances))
    return root


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


def tiny(model_class, num_classes=5, **kwargs):
    return model_class(num_classes, "resnet18", width=8, head_width=16, **kwargs)


TESTDATA = Path(__file__).with_name("testdata")


def rule_weights(keys, dtype=torch.float64):
    """The weights of checkpoints/README.md's rule for a key list: one generator per key, seeded with
    the key's CRC-32, one draw in float64 (cast to `dtype` afterwards)."""
    state = {}
    for key, shape in keys:
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        rand = lambda: torch.rand(shape, generator=g, dtype=torch.float64)  # noqa: E731
        randn = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
        numel = math.prod(shape)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
            continue
        if key.endswith("running_mean"):
            value = 0.1 * randn()
        elif key.endswith("running_var"):
            value = 0.75 + 0.5 * rand()
        elif key.endswith(".scale"):
            value = -rand()
        elif key.endswith("codewords"):
            value = (2 * rand() - 1) / math.sqrt(numel)
        elif len(shape) >= 2:
            value = randn() * math.sqrt(2 / (numel / shape[0]))
        elif key.endswith("weight"):
            value = 0.5 + 0.5 * rand()
        else:
            value = 0.1 * randn()
        state[key] = value.to(dtype)
    return state


def zoo_file(name, path, meta=None):
    """Write the rule's weights for testdata/{name}.keys.json in that zoo's format, in float32 as the real
    files are (the reference logits were computed in float64 from float32-rounded weights: from the rule's
    float64 values they differ by up to 1.6e-6); returns the key spec and the state_dict."""
    spec = json.loads((TESTDATA / f"{name}.keys.json").read_text())
    state = rule_weights(spec["keys"], torch.float32)
    if spec["format"] == "mmseg":
        torch.save({"meta": meta or {}, "state_dict": state}, path)
    else:
        torch.save(state, path)
    return spec, state


def tiny_checkpoint(path):
    """A train_seg.py checkpoint of a tiny EncNet with trained-looking BN statistics; returns the model."""
    torch.manual_seed(0)
    model = encnet.EncNet(5, "resnet18", width=8, head_width=16, aux=True, lateral=True)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 32, 32))  # moves the running statistics off their defaults
    args = dict(data="context", model="encnet", backbone="resnet18", num_classes=5, width=8, head_width=16,
                num_codes=32, se_loss=True, aux=True, lateral=True, residual_gate=False, dropout=0.1,
                crop_size=32, base_size=40)
    torch.save({"model": model.state_dict(), "optimizer": {}, "iter": 1, "epoch": 0, "args": args,
                "classes": list("abcde"), "palette": [[i, 0, 0] for i in range(5)]}, path)
    return model.eval()


def offline(url, dst, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


TINY = ["--width", "8", "--head-width", "16", "--batch-size", "4", "--log-every", "0"]


def run(script, *args, nproc=0, env=None, timeout=300, check=True):
    """Run a script of the repo as a user would (under torchrun when nproc > 0)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc else [sys.executable]
    result = subprocess.run(launcher + [script, *map(str, args)], cwd=HERE, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def killed_at(tmp_path, script, at_iter):
    """`script` (train_seg.py or train_cifar.py) as a file that SIGKILLs its rank 0 when iteration `at_iter`
    begins, on torchrun's first attempt only: the schedule function, which the loop calls once per
    iteration, is wrapped from outside. The training code itself has no fault-injection flag."""
    module = script.removesuffix(".py")
    hook = {"train_seg": "poly_lr", "train_cifar": "cosine_lr"}[module]
    path = tmp_path / f"killed_{script}"
    path.write_text(f"""import os, signal, sys
sys.path.insert(0, {str(HERE)!r})
import {module}
original = {module}.{hook}
def {hook}(optimizer, base_lr, it, *rest):
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if it == {at_iter} and first_attempt and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return original(optimizer, base_lr, it, *rest)
{module}.{hook} = {hook}
{module}.main()
""")
    return path


def weights(out_dir):
    return zoo.read_checkpoint(os.path.join(out_dir, "checkpoint.pth"))["model"]


def assert_same_weights(a, b):
    """Bitwise equal: the same computation in the same order (a resumed run and an uninterrupted one)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_update(a, b, initial, tol=1e-2):
    """Two runs that compute the same steps in another order (other processes, threads or kernels) made the
    same training update: ‖Δa − Δb‖ ≤ tol·‖Δa‖, Δ = weights − initial, all float tensors as one vector.

    Why the whole update and this bound, on any CPU: float32 reductions summed in another order differ by a
    few units of rounding (2^-24 ≈ 6e-8) per step, and 4 steps of a tiny net keep it there (measured 2–4e-7
    with 1 or 2 threads and 1, 2 or 4 processes). Rarely, an input of a ReLU or max-pool lies within rounding
    of zero and takes the other branch; that step's gradient then moves by a few 1e-4 and the update by up
    to 2e-3 after 4 steps (seen once, 2 processes against 1). Per-tensor bounds are hit hardest by such a
    flip (tiny updates, e.g. early BatchNorm statistics, move most) and were what failed on another CPU. A
    real error moves the update by far more than 1e-2: measured on the data of `two` 3.5e-2 for each process
    dividing by its own labelled pixels, 4.1e-2 for dividing by all pixels, 0.14 for BatchNorm not
    synchronised across processes."""
    floats = [k for k in a if a[k].is_floating_point()]
    assert a.keys() == b.keys() and set(floats) <= initial.keys()
    update = torch.cat([(a[k].double() - initial[k].double()).flatten() for k in floats])
    difference = torch.cat([(a[k].double() - b[k].double()).flatten() for k in floats])
    assert update.norm() > 0 and difference.norm() <= tol * update.norm(), (difference.norm() / update.norm())


def train_seg_failure(argv, monkeypatch, capsys):
    """Run train_seg.main(argv) in this process, as the command line calls it, for a case that must stop
    with a non-zero exit and a message, not a traceback → the message."""
    monkeypatch.setattr(sys, "argv", ["train_seg.py"])
    with pytest.raises(SystemExit) as stopped:  # anything else (a traceback) fails the test
        train_seg.main([str(a) for a in argv])
    assert stopped.value.code != 0
    stderr = capsys.readouterr().err
    assert stderr.startswith("train_seg.py: error: ") and "Traceback" not in stderr, stderr
    return stderr


@pytest.fixture(scope="module")
def fcn_run(tmp_path_factory):
    """Output folder of an FCN trained for one iteration: a checkpoint that does not fit an EncNet."""
    out = tmp_path_factory.mktemp("fcn")
    run("train_seg.py", *TINY, "--max-iters", 1, "--model", "fcn", "--out", out)
    return out


def re_search(pattern, text):
    """re.search that fails the test, showing the text, when nothing matches."""
    found = re.search(pattern, text)
    assert found, f"no match for {pattern!r} in:\n{text[-3000:]}"
    return found


def tiny_encnet(num_classes=5):
    torch.manual_seed(0)
    return tiny(encnet.EncNet, num_classes).eval()


def fake_zoo(monkeypatch, dataset="ade20k", num_classes=150, crop=32, base=40, data_root=None):
    """zoo.load_model replaced by a tiny EncNet with `info` as the contract describes it."""
    info = dict(format="train_seg", dataset=dataset, crop_size=crop, base_size=base, data_root=data_root,
                classes=[f"class{i}" for i in range(num_classes)],
                palette=[[i % 256, (7 * i) % 256, (13 * i) % 256] for i in range(num_classes)])
    loaded = []

    def load_model(source):
        if source == "broken":
            raise errors.DownloadError("https://example/x.pth: download failed (no network)")
        if source == "missing.pth":
            raise errors.CheckpointError("missing.pth: no such file, and not a zoo name")
        loaded.append(source)
        return tiny_encnet(num_classes), dict(info)

    monkeypatch.setattr(zoo, "load_model", load_model)
    return loaded


def main_exit(argv):
    with pytest.raises(SystemExit) as e:
        seg_eval.main([str(a) for a in argv])
    return e.value.code


def direct_repo_predict(model, image, crop_size, base_size, scales=(1.0,), flip=False):
    """Protocol 'repo' written directly, the tests' reference for protocols.predict: one forward per window and
    per mirror image, loops instead of Views. image 1×3×H×W normalised → 1×K×H×W probabilities."""
    def windows_logits(image):
        _, _, h, w = image.shape
        if h <= crop_size and w <= crop_size:
            logits = model(image).float()
            return (logits + model(image.flip(-1)).float().flip(-1)) / 2 if flip else logits
        ph, pw = max(h, crop_size), max(w, crop_size)
        padded = torch.nn.functional.pad(image, (0, pw - w, 0, ph - h))
        stride = max(1, int(crop_size * 2 / 3))
        ys = sorted({min(y, ph - crop_size) for y in range(0, ph - crop_size + stride, stride)})
        xs = sorted({min(x, pw - crop_size) for x in range(0, pw - crop_size + stride, stride)})
        total = count = None
        for y in ys:
            for x in xs:
                window = padded[:, :, y:y + crop_size, x:x + crop_size]
                logits = model(window).float()
                if flip:
                    logits = (logits + model(window.flip(-1)).float().flip(-1)) / 2
                if total is None:
                    total, count = logits.new_zeros(1, logits.shape[1], ph, pw), logits.new_zeros(1, 1, ph, pw)
                total[:, :, y:y + crop_size, x:x + crop_size] += logits
                count[:, :, y:y + crop_size, x:x + crop_size] += 1
        return (total / count)[:, :, :h, :w]

    _, _, h, w = image.shape
    probs = 0
    with torch.no_grad():
        for scale in scales:
            long_side = int(base_size * scale + 0.5)
            size = (long_side, int(w * long_side / h + 0.5)) if h >= w else (int(h * long_side / w + 0.5), long_side)
            resized = torch.nn.functional.interpolate(image, size, mode="bilinear", align_corners=False)
            logits = torch.nn.functional.interpolate(windows_logits(resized), (h, w), mode="bilinear",
                                                     align_corners=False)
            probs = probs + logits.softmax(1) / len(scales)
    return probs


@pytest.fixture(autouse=True)
def recompute_every_bn_relu():
    """The tests' models are tiny: below encnet.RECOMPUTE_MIN_ELEMENTS the step would take the plain path, so
    in-process tests lower it to 0 and every BatchNorm → ReLU → conv goes through the recomputing Function.
    Not by `monkeypatch`: a test's monkeypatch.undo() (to resume a run as a user would) must not undo this."""
    saved, encnet.RECOMPUTE_MIN_ELEMENTS = encnet.RECOMPUTE_MIN_ELEMENTS, 0
    yield
    encnet.RECOMPUTE_MIN_ELEMENTS = saved
