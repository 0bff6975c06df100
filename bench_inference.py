"""Benchmarks of the data and inference paths, sections of bench.py: data, coco, resize, eval, photo, cpu_bf16, export.

Each is a ratio against its alternative measured in the same run (see bench.py); `python bench.py --only NAME`.
"""
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import coco_masks
import cv_resize
import context_data
import data
import layouts
import encnet
import export
import metric
import protocols
import run
import transforms
import zoo
from measure import timeit_alternating

# optional (test requirements): the sections that compare against them say "not measured" without them
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
try:
    import pycocotools.mask as coco_mask
except ImportError:
    coco_mask = None


def sequential_item(dataset, index, crop_size, base_size):
    """The released code's pipeline: flip → resize → rotate → pad → crop, whole images, Pillow."""
    image_path, label_path = dataset.samples[index]
    image = Image.open(image_path).convert("RGB")
    raw = layouts.read_png_label(label_path)
    np.bincount(raw.ravel(), minlength=256)  # the same label check as the dataset's
    label = Image.fromarray(raw)
    rng = np.random.default_rng([dataset.seed, dataset.epoch, index])  # draws in augment_train's order
    if rng.random() < 0.5:
        image, label = ImageOps.mirror(image), ImageOps.mirror(label)
    w, h = image.size
    long_side = int(rng.integers(int(base_size * 0.5), int(base_size * 2.0), endpoint=True))
    sw, sh = (int(w * long_side / h + 0.5), long_side) if h > w else (long_side, int(h * long_side / w + 0.5))
    image, label = image.resize((sw, sh), Image.BILINEAR), label.resize((sw, sh), Image.NEAREST)
    angle = rng.uniform(-10, 10)
    image, label = image.rotate(angle, Image.BILINEAR), label.rotate(angle, Image.NEAREST, fillcolor=255)
    pad_w, pad_h = max(crop_size - sw, 0), max(crop_size - sh, 0)
    if pad_w or pad_h:
        image = ImageOps.expand(image, (0, 0, pad_w, pad_h), fill=0)
        label = ImageOps.expand(label, (0, 0, pad_w, pad_h), fill=255)
    x1 = int(rng.integers(0, sw + pad_w - crop_size, endpoint=True))
    y1 = int(rng.integers(0, sh + pad_h - crop_size, endpoint=True))
    box = (x1, y1, x1 + crop_size, y1 + crop_size)
    return transforms.image_tensor(image.crop(box)), torch.from_numpy(dataset.lut[np.asarray(label.crop(box))])


def bench_data(quick):
    """Whole training items (JPEG + PNG decode, label check, augmentation) from synthetic ADE20K-sized
    files (683×512, JPEG quality 90), one core, crop 480 / base 520, the same random draws for both; and
    data.check_dataset's cost per item (the pre-training check of a split) against loading it for training."""
    crop_size, base_size = 480, 520
    num_images, epochs = (4, 1) if quick else (8, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    seconds = {"warp": 0.0, "sequential": 0.0, "check": 0.0}
    with tempfile.TemporaryDirectory() as root:
        image_dir = Path(root, "ADEChallengeData2016", "images", "training")
        label_dir = Path(root, "ADEChallengeData2016", "annotations", "training")
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for i in range(num_images):  # smooth colour fields with some grain, blocky label regions
            smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize((683, 512), Image.BICUBIC)
            image = np.clip(np.asarray(smooth) + rng.normal(0, 6, (512, 683, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(image_dir / f"{i:04d}.jpg", quality=90)
            label = Image.fromarray(rng.integers(0, 151, (8, 11), np.uint8)).resize((683, 512), Image.NEAREST)
            label.save(label_dir / f"{i:04d}.png")
        dataset = data.get_dataset("ade20k", root, "train", crop_size, base_size)
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            for index in range(num_images):  # alternate, so background load hits both alike
                # "check": what check_dataset does per item before training (full decode, label values)
                for name, item in (("warp", lambda i: dataset[i]),
                                   ("sequential", lambda i: sequential_item(dataset, i, crop_size, base_size)),
                                   ("check", lambda i: data.check_dataset(dataset, workers=0, indices=[i]))):
                    start = time.perf_counter()
                    item(index)
                    seconds[name] += time.perf_counter() - start
    torch.set_num_threads(threads)
    items = epochs * num_images
    warp = items / seconds["warp"]
    return {"warp_items_per_s_per_core": warp, "sequential_items_per_s_per_core": items / seconds["sequential"],
            "speedup": seconds["sequential"] / seconds["warp"],
            # the pre-training check of a split costs this share of one epoch's loading of it
            "check_items_per_s_per_core": items / seconds["check"],
            "check_vs_epoch_loading": seconds["check"] / seconds["warp"],
            # a GPU step consuming R images/s needs R / warp loader cores
            "loader_cores_per_100_images_per_s": 100 / warp}


def coco_polygons(rng, count, height, width):
    """Object outlines as COCO stores them: star-shaped polygons of 10–100 vertices, 10–200 px across,
    coordinates with 2 decimals, some crossing the image border."""
    polygons = []
    for _ in range(count):
        k = int(rng.integers(10, 101))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = rng.uniform(5, 100) * rng.uniform(0.6, 1, k)
        points = rng.uniform(0, 1, 2) * (width, height) + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
        polygons.append(points.round(2).ravel().tolist())
    return polygons


def bench_coco(quick):
    """COCO polygon → H×W mask on 640×480 images: coco_masks.segmentation_mask (NumPy) vs pycocotools (C) as
    annToMask does it (frPyObjects, merge, decode), one polygon per mask, the masks compared."""
    if coco_mask is None:
        return {"status": "not measured: pycocotools is not installed"}
    height, width = 480, 640
    count, repeat = (20, 3) if quick else (300, 9)
    polygons = coco_polygons(np.random.default_rng(0), count, height, width)

    def ours():
        return [coco_masks.segmentation_mask([polygon], height, width) for polygon in polygons]

    def theirs():
        with warnings.catch_warnings():  # pycocotools' decode under NumPy 2: a DeprecationWarning per call
            warnings.simplefilter("ignore", DeprecationWarning)
            return [coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([polygon], height, width)))
                    for polygon in polygons]

    seconds = timeit_alternating({"ours": ours, "pycocotools": theirs}, repeat)
    identical = sum(np.array_equal(a, b.astype(bool)) for a, b in zip(ours(), theirs()))
    return {"ours_masks_per_s": count / seconds["ours"], "pycocotools_masks_per_s": count / seconds["pycocotools"],
            "ours_time_vs_pycocotools": seconds["ours"] / seconds["pycocotools"],
            "identical_masks": f"{identical}/{count}"}


def bench_eval(quick, device=None):
    """eval.py's protocol 'repo' on one 512×512 image with EncNet-ResNet50 (150 classes, crop 480, base 520):
    images/s single- and multi-scale (6 scales + flips), one window per forward vs protocols.predict's defaults
    (on a GPU windows and mirror images 8 per batch), their largest probability difference,
    and on a GPU bf16 autocast (speed, share of pixels whose class agrees with float32). Then the class map
    of a score map at the built-in data's and ADE20K's shape: argmax(1) against protocols.predicted_classes."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    backbone, kwargs, size, crop, base = ("resnet18", dict(width=8, head_width=16), 64, 48, 52) if quick else \
        ("resnet50", {}, 512, 480, 520)
    model = encnet.EncNet(150, backbone, **kwargs).eval().to(device)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, size, size), np.uint8))
    image = transforms.normalize(pixels.to(device))

    def synced(fn):
        def run():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return run

    on_cpu_full = device.type == "cpu" and not quick  # a multi-scale image takes minutes on 2 cores
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "image": f"{size}x{size}, crop {crop}, base {base}, {backbone}"}
    for label, scales, flip in (("single_scale", (1.0,), False), ("multi_scale", protocols.MULTI_SCALES, True)):
        today = synced(lambda: protocols.predict(model, image, crop, base, scales, flip, window_batch=1))
        new = synced(lambda: protocols.predict(model, image, crop, base, scales, flip))
        repeat, warmup = (1, 0) if quick or (on_cpu_full and flip) else (3, 1) if on_cpu_full else (5, 2)
        times = timeit_alternating({"today": today, "new": new}, repeat, warmup)
        result[f"{label}_one_window_per_forward_images_per_s"] = 1 / times["today"]
        result[f"{label}_default_batching_images_per_s"] = 1 / times["new"]
        result[f"{label}_speedup"] = times["today"] / times["new"]
        result[f"{label}_max_prob_difference"] = (today() - new()).abs().max().item()
        if device.type == "cuda":  # the difference above includes TF32's rounding (cuDNN's default)
            tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
            result[f"{label}_max_prob_difference_without_tf32"] = (today() - new()).abs().max().item()
            torch.backends.cudnn.allow_tf32 = tf32
            bf16 = synced(lambda: protocols.predict(model, image, crop, base, scales, flip, amp=True))
            times = timeit_alternating({"fp32": new, "bf16": bf16}, repeat, warmup)
            result[f"{label}_bf16_speedup_over_new_fp32"] = times["fp32"] / times["bf16"]
            agree = (bf16().argmax(1) == new().argmax(1)).double().mean().item()
            result[f"{label}_bf16_pixels_agreeing_pct"] = 100 * agree

    # the class map of the scores: argmax(1) against protocols.predicted_classes (max(1).indices, the same indices)
    context = (1, len(context_data.CONTEXT_CLASSES), context_data.CONTEXT_HEIGHT, context_data.CONTEXT_WIDTH)
    shapes = {"context": context} if quick else {"context": context, "ade20k": (1, 150, 512, 683)}
    for label, shape in shapes.items():
        scores = torch.rand(shape, device=device)
        times = timeit_alternating({"argmax": synced(lambda: scores.argmax(1)),
                                    "max_indices": synced(lambda: protocols.predicted_classes(scores))},
                                   3 if quick else 10)
        result[f"class_map_{label}_argmax_ms"] = 1e3 * times["argmax"]
        result[f"class_map_{label}_max_indices_ms"] = 1e3 * times["max_indices"]
        result[f"class_map_{label}_speedup"] = times["argmax"] / times["max_indices"]
    return result


PHOTO_PROBE = """
import resource, sys, time, eval
start = time.time()
eval.main(sys.argv[1:])
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "SECONDS", time.time() - start)
"""


def bench_photo(quick):
    """eval.py --images on a phone photo (4000×3000) with EncNet-ResNet50 of 150 classes, as a user runs it
    (one process, CPU): peak resident memory and time, against the same command on a photo that is already
    at the model's scale (520×390), whose peak is the model's own. Each in a fresh process (ru_maxrss)."""
    backbone, kwargs, big, small = ("resnet18", dict(width=8, head_width=16), (400, 300), (52, 39)) if quick else \
        ("resnet50", {}, (4000, 3000), (520, 390))
    base = small[0]
    result = {"setting": f"EncNet-{backbone}, 150 classes, base size {base}, protocol repo, float32"}
    ade = data.dataset_info("ade20k")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = encnet.EncNet(150, backbone, **kwargs)
        args = dict(data="ade20k", model="encnet", backbone=backbone, num_classes=150, crop_size=base,
                    base_size=base, **kwargs)
        torch.save({"model": model.state_dict(), "optimizer": {}, "iter": 0, "epoch": 0, "args": args,
                    "classes": ade["classes"], "palette": ade["palette"]}, os.path.join(tmp, "model.pth"))
        rng = np.random.default_rng(0)
        for label, (w, h) in (("model_scale", small), ("photo", big)):
            smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize((w, h), Image.BICUBIC)
            smooth.save(os.path.join(tmp, f"{label}.jpg"), quality=90)
            done = subprocess.run([sys.executable, "-c", PHOTO_PROBE, "--checkpoint", os.path.join(tmp, "model.pth"),
                                   "--images", os.path.join(tmp, f"{label}.jpg"), "--out",
                                   os.path.join(tmp, f"out_{label}")], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__)))
            if done.returncode != 0:
                raise RuntimeError(f"bench_photo: eval.py failed:\n{done.stderr[-2000:]}")
            words = done.stdout.split()
            peak_kib, seconds = int(words[words.index("PEAK_KIB") + 1]), float(words[words.index("SECONDS") + 1])
            result[f"{label}_{w}x{h}_peak_GiB"] = peak_kib / 2**20
            result[f"{label}_{w}x{h}_seconds"] = seconds
    result["photo_peak_above_the_models_own_GiB"] = (result[f"photo_{big[0]}x{big[1]}_peak_GiB"]
                                                     - result[f"model_scale_{small[0]}x{small[1]}_peak_GiB"])
    return result


def bench_cpu_bf16(quick, checkpoint="runs/seg/checkpoint.pth"):
    """eval.py on the built-in validation split with the quick start's model (`python train_seg.py` writes
    runs/seg/checkpoint.pth): float32 against bf16 autocast + channels_last (what --amp does on a CPU with
    native bf16) — seconds, pixAcc/mIoU, share of pixels with the same class. On a CPU without AVX512-BF16/AMX
    bf16 is emulated: the accuracy figures hold, the time does not (cpu_native_bf16 says which)."""
    if quick:  # a random tiny model on a few images: checks that the section runs
        torch.manual_seed(0)
        model, indices = encnet.EncNet(len(context_data.CONTEXT_CLASSES), "resnet18", width=8, head_width=16), range(8)
    elif not os.path.exists(checkpoint):
        return {"status": f"not measured: no {checkpoint} (run `python train_seg.py` first)"}
    else:
        model, indices = zoo.load_model(checkpoint)[0], None
    dataset = data.get_dataset("context", None, "val", context_data.CONTEXT_WIDTH, context_data.CONTEXT_WIDTH, mode="val")
    indices = list(indices or range(len(dataset)))
    result = {"cpu_native_bf16": run.cpu_has_fast_bf16(), "images": len(indices)}
    predictions = {}
    for label, amp in (("fp32", False), ("bf16", True)):
        model.eval().to(memory_format=torch.channels_last if amp else torch.contiguous_format)
        predictor = protocols.make_predictor("repo", context_data.CONTEXT_WIDTH, context_data.CONTEXT_WIDTH, "context", amp=amp)
        start = time.perf_counter()
        scores = metric.evaluate(model, dataset, indices, torch.device("cpu"), predictor)
        result[f"{label}_seconds"] = time.perf_counter() - start
        result[f"{label}_pixAcc_pct"], result[f"{label}_mIoU_pct"] = (100 * v for v in scores.pixacc_miou())
        with torch.no_grad():
            predictions[label] = torch.stack([protocols.class_map(predictor(model, transforms.normalize(dataset[i][0][None])),
                                                                 dataset[i][1].shape) for i in indices])
    result["bf16_speedup"] = result["fp32_seconds"] / result["bf16_seconds"]
    result["pixels_same_class_pct"] = 100 * (predictions["fp32"] == predictions["bf16"]).double().mean().item()
    return result


def bench_export(quick):
    """The exported ONNX file in onnxruntime (CPU) against eager PyTorch, EncNet-ResNet50 150 classes at 512×512,
    batch 1, float32, timed in turns; and their largest logit difference relative to the logits' scale."""
    if onnxruntime is None:
        return {"status": "not measured: onnxruntime is not installed (pip install onnx onnxscript onnxruntime)"}
    backbone, kwargs, size = ("resnet18", dict(width=8, head_width=16), 64) if quick else ("resnet50", {}, 512)
    torch.manual_seed(0)
    model = encnet.EncNet(150, backbone, **kwargs).eval()
    info = dict(classes=[str(i) for i in range(150)], palette=[[i, i, i] for i in range(150)], dataset="ade20k",
                source="bench", crop_size=size, base_size=size)
    images = torch.randn(1, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        start = time.perf_counter()
        export.export(model, info, path)
        export_seconds = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores as eager
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy()}

        def eager():
            with torch.no_grad():
                return model(images)
        times = timeit_alternating({"eager": eager, "onnxruntime": lambda: session.run(None, feed)},
                                   *((1, 0) if quick else (5, 1)))
        theirs, ours = torch.from_numpy(session.run(None, feed)[0]), eager()
    return {"setting": f"EncNet-{backbone}, 150 classes, {size}x{size}, batch 1, float32, "
                       f"{torch.get_num_threads()} threads", "export_seconds": export_seconds,
            "eager_ms": 1e3 * times["eager"], "onnxruntime_ms": 1e3 * times["onnxruntime"],
            "onnxruntime_speedup": times["eager"] / times["onnxruntime"],
            "max_logit_difference_rel": ((theirs - ours).abs().max() / ours.abs().max()).item()}


def bench_resize(quick):
    """mmsegmentation's resize (OpenCV's bilinear, bit for bit: cv_resize.resize_linear) against the
    F.interpolate(bilinear)-then-round it replaced, on uint8 images.

    Both paths take an H x W x 3 uint8 numpy array and return one (conversions included).
    They are timed alternately in the same loop; figures are medians over the repeats.
    Also reports the fraction of output values where interpolate-then-round differs from
    cv_resize (which equals cv2.resize INTER_LINEAR bit for bit).
    """
    repeats = 5 if quick else 21
    rng = np.random.default_rng(34)

    def photo_like(h, w):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = 90 + 70 * yy / (h - 1) + 50 * xx / (w - 1) + 30 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
        img = np.stack([base + 25 * c - 20 * np.cos((xx + yy) / (9.0 + c)) for c in range(3)], -1)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def interpolate_round(img, size):
        t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        f = torch.nn.functional.interpolate(t, size=size, mode="bilinear",
                                            align_corners=False, antialias=False)
        return f[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()

    cases = [("427x640->512x767", (427, 640), (512, 767)),
             ("1024x1366->512x683", (1024, 1366), (512, 683))]
    figures = {"repeats": repeats, "torch_threads": torch.get_num_threads()}
    for name, (h, w), size in cases:
        img = photo_like(h, w)
        ours, naive = cv_resize.resize_linear(img, size), interpolate_round(img, size)
        med = timeit_alternating({"ours": lambda: cv_resize.resize_linear(img, size),
                                  "naive": lambda: interpolate_round(img, size)}, repeats)
        m_ours, m_naive = med["ours"], med["naive"]
        figures[name] = {
            "cv_resize_ms": round(1e3 * m_ours, 3),
            "interpolate_ms": round(1e3 * m_naive, 3),
            "ratio cv_resize / interpolate": round(m_ours / m_naive, 3),
            "frac_values_differ": round(float(np.mean(naive != ours)), 4),
            "max_abs_diff": int(np.abs(naive.astype(np.int16) - ours).max()),
        }
    # a training crop (mmsegmentation's RandomResize then RandomCrop): only the crop's window of the resized image
    # (transforms.resized_window) against the whole resized image, then its crop; the same bits
    img, size, crop = photo_like(512, 683), (1024, 1366), (200, 712, 300, 812)
    timed = {"window": lambda: cv_resize.resize_linear(img, size, crop),
             "whole": lambda: cv_resize.resize_linear(img, size)[crop[0]:crop[1], crop[2]:crop[3]]}
    assert np.array_equal(timed["window"](), timed["whole"]())
    med = timeit_alternating(timed, repeats)
    figures["512x683->1024x1366, a 512x512 training crop"] = {
        "window_ms": round(1e3 * med["window"], 3), "whole_then_crop_ms": round(1e3 * med["whole"], 3),
        "speedup": round(med["whole"] / med["window"], 3)}
    return figures

