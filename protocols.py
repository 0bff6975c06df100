"""The test-time procedures: how a trained model's scores for one image are made, protocol by protocol.

Protocols (eval.py --protocol), each the test-time procedure behind a set of published numbers:
  repo      (default) this project's own. Long side resized to base size (bilinear, align_corners=False);
            where larger than the crop, crop-sized windows at stride 2/3 crop, shifted back to end at the
            border, logits averaged where they overlap; an image smaller than the crop is one unpadded
            forward. --multi-scale: scales 0.5–1.75 of the base size, each with its mirror image (logits
            of the pair averaged), softmax probabilities averaged over scales at the original resolution.
            mIoU over the classes present in the labels or predictions.
  released  the authors' code (PyTorch-Encoding: encoding/models/base.py MultiEvalModule, experiments/
            segmentation/test.py), always multi-scale with flips: long side ceil(base·s) for s in 0.5–1.75
            (Cityscapes 0.75–2.25), bilinear with align_corners=True; the image padded (bottom/right) with
            the colour that normalises to 0 − mean/std, i.e. black, up to the crop, also when it fits in one
            crop; windows from 0 at stride int(2/3 crop), the last ones padded; each window's score is
            exp(logits + logits of its mirror image), averaged where windows overlap; the scores of all
            scales are summed at the original resolution. mIoU counts a class absent from labels and
            predictions as 0. PASCAL-Context's 60-class figure: mIoU·59/60 (background counted as wrong).
  mmseg     mmsegmentation's single-scale test (mode='whole'): resized to fit a (2048, 512) box (Cityscapes
            (2048, 1024)) keeping the aspect ratio (OpenCV's bilinear on the uint8 image, bit for bit: cv_resize),
            one forward of the whole image, logits resized back (align_corners=False), softmax, argmax.
            mIoU as `repo`.
  mmseg-ms  the same with the box times img_ratios 0.5–1.75 (0.x MultiScaleFlipAug, which made the published
            numbers; 1.x's TestTimeAug scales the image itself) and flips, softmax probabilities averaged
            (--protocol mmseg --multi-scale is the same).

Every protocol's prediction is made at the model's scale (one score map per scale and mirror image: a `View`)
and brought to the image's full resolution in bands of rows (`class_map`), so a 12-megapixel photo never needs
a full-resolution score map of all classes.

Speed: on a GPU the windows of a scale go through the model 8 at a time, then their mirror images
(--window-batch); eval-mode BatchNorm and the Encoding layer treat samples independently, so this changes
probabilities by float rounding only. --amp (bf16 autocast, with channels_last on a CPU) where bf16 is native:
a GPU, or a CPU with AVX512-BF16/AMX; elsewhere it falls back to float32 and says so. bench.py --only eval
measures both, and what bf16 costs in accuracy.

    make_predictor    protocol → fn(model, image) → [View]
    class_map         [View] → the H×W class map, a band of rows at a time
    predict, predict_released, predict_mmseg   the full-resolution scores of each protocol (tests, small images)
    eval_crop         the evaluation window of a model trained with a given crop
    segment           one call from a model and an image (PIL, NumPy, tensor) to its class map, with the
                      model's own protocol and sizes by default (default_protocol); eval.py --images uses it
"""
import math
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cv_resize
from errors import UserError
from transforms import MEAN, STD, normalize, to_rgb

PROTOCOLS = ("repo", "released", "mmseg", "mmseg-ms")
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# PyTorch-Encoding experiments/segmentation/test.py: `scales = [0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25] if
# args.dataset == 'citys' else [0.5, …, 1.75]`, MultiEvalModule's default, which the EncNet-era test.py used
# for every dataset (one revision of test.py has 0.5–2.0 for the others).
RELEASED_SCALES = {"cityscapes": (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25)}
# mmsegmentation configs/_base_/datasets/{ade20k,cityscapes,pascal_voc12,pascal_voc12_aug}.py: the test
# pipeline's Resize(keep_ratio=True) box (long, short); MultiScaleFlipAug multiplies it by each img_ratio.
MMSEG_TEST_BOX = {"ade20k": (2048, 512), "cityscapes": (2048, 1024), "pascal_voc": (2048, 512),
                  "pascal_aug": (2048, 512)}
# Windows per forward: batched on GPUs, one at a time on CPUs, which was faster there (bench.py --only eval).
WINDOW_BATCH = {"cuda": 8, "cpu": 1}


def predicted_classes(scores):
    """B×K×H×W scores → B×H×W class indices, the first maximum, as argmax gives. max(1).indices is argmax(1)
    without its slow strided CPU kernel (bench.py --only eval times both)."""
    return scores.max(1).indices


# ----------------------------------------------------------------------------- from the model's scale to the image's

class View(NamedTuple):
    """One prediction of a protocol at the model's scale (one scale, or its mirror image): its contribution to
    the image's scores is weight · f(bilinear(scores → image size)), f = softmax over classes or identity."""
    scores: torch.Tensor  # 1×K×h×w, float32
    align_corners: bool
    softmax: bool
    weight: float = 1.0


def source_rows(out_rows, in_size, out_size, align_corners):
    """Bilinear interpolation along one axis as F.interpolate computes it: for output indices `out_rows` (a
    1-D tensor) → (lower source index, upper source index, weight of the upper one)."""
    y = out_rows.double()
    if align_corners:
        src = y * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:
        src = ((y + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    low = src.floor().long().clamp_max(in_size - 1)
    return low, (low + 1).clamp_max(in_size - 1), (src - low).float()


def view_rows(view, size, rows):
    """Rows `rows` (a range) of the view's contribution at the image size (H, W) → 1×K×len(rows)×W: bilinear
    along the height by hand for these rows only, then F.interpolate along the width."""
    scores = view.scores
    low, high, upper = source_rows(torch.arange(rows.start, rows.stop), scores.shape[2], size[0], view.align_corners)
    upper = upper.to(scores.device).view(1, 1, -1, 1)
    band = scores[:, :, low] * (1 - upper) + scores[:, :, high] * upper  # 1×K×rows×w
    band = F.interpolate(band, (len(rows), size[1]), mode="bilinear", align_corners=view.align_corners)
    return view.weight * (band.softmax(1) if view.softmax else band)


def full_scores(views, size):
    """The image's scores at full resolution, 1×K×H×W: Σ over views (for tests and small images)."""
    total = 0
    for view in views:
        up = F.interpolate(view.scores, size, mode="bilinear", align_corners=view.align_corners)
        total = total + view.weight * (up.softmax(1) if view.softmax else up)
    return total


def class_map(views, size, band_bytes=64 << 20):
    """The image's H×W class indices: argmax of full_scores(views, size), computed a band of rows at a time, so
    that memory stays at K × band × W floats (band_bytes) however large the image. The same classes as
    full_scores up to float rounding (the two interpolations round in another order): a pixel whose two best
    classes are within rounding of each other may differ."""
    height, width = size
    classes, device = views[0].scores.shape[1], views[0].scores.device
    band = max(1, band_bytes // (4 * classes * width))
    out = torch.empty(height, width, dtype=torch.int64, device=device)
    for start in range(0, height, band):
        rows = range(start, min(start + band, height))
        total = sum(view_rows(view, size, rows) for view in views)
        out[rows.start:rows.stop] = predicted_classes(total)[0]
    return out


# ----------------------------------------------------------------------------- protocol 'repo'

def stitch_windows(model, windows, boxes, height, width, flip, fuse, window_batch=None):
    """Scores of N same-sized windows averaged where they overlap on a height×width canvas → 1×K×height×width.

    boxes[i] = (y0, y1, x0, x1): where window i lies; its top-left (y1−y0)×(x1−x0) part is kept. fuse(logits,
    mirrored) → the window's scores, mirrored being the logits of its mirror image flipped back (None without
    flip). Windows, then their mirror images, go through the model window_batch at a time (default:
    WINDOW_BATCH of the device)."""
    batch = window_batch or WINDOW_BATCH.get(windows.device.type, 1)
    total = count = None
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        mirrored = model(chunk.flip(-1)).float().flip(-1) if flip else None
        scores = fuse(model(chunk).float(), mirrored)
        if total is None:
            total, count = scores.new_zeros(1, scores.shape[1], height, width), scores.new_zeros(1, 1, height, width)
        for (y0, y1, x0, x1), s in zip(boxes[start:], scores):
            total[0, :, y0:y1, x0:x1] += s[:, :y1 - y0, :x1 - x0]
            count[0, :, y0:y1, x0:x1] += 1
    return total / count


def repo_windows(height, width, crop_size):
    """Top-left corners of crop-sized windows at stride 2/3 crop covering height×width (both ≥ crop),
    the last row and column shifted back to end at the border."""
    stride = max(1, int(crop_size * 2 / 3))
    ys = sorted({min(y, height - crop_size) for y in range(0, height - crop_size + stride, stride)})
    xs = sorted({min(x, width - crop_size) for x in range(0, width - crop_size + stride, stride)})
    return [(y, x) for y in ys for x in xs]


def sliding_window_logits(model, image, crop_size, flip=False, window_batch=None):
    """Logits of an image of any size: one forward when it fits in a crop_size window, else windows of
    crop_size at stride 2/3·crop, averaged where they overlap (edges zero-padded, i.e. the normalised
    mean colour, up to the crop size). With flip, each window's logits are averaged with those of its
    mirror image. image: 1×3×H×W normalised → 1×K×H×W."""
    _, _, h, w = image.shape
    if h <= crop_size and w <= crop_size:
        # no padding: the Encoding layer's global statistics would count the padded pixels
        ph, pw, size, corners, windows = h, w, (h, w), [(0, 0)], image
    else:
        ph, pw, size = max(h, crop_size), max(w, crop_size), (crop_size, crop_size)
        padded = F.pad(image, (0, pw - w, 0, ph - h))
        corners = repo_windows(ph, pw, crop_size)
        windows = torch.cat([padded[:, :, y:y + crop_size, x:x + crop_size] for y, x in corners])
    boxes = [(y, y + size[0], x, x + size[1]) for y, x in corners]
    return stitch_windows(model, windows, boxes, ph, pw, flip, repo_fusion, window_batch)[:, :, :h, :w]


def repo_fusion(logits, mirrored):
    """A window's logits, averaged with those of its mirror image."""
    return logits if mirrored is None else (logits + mirrored) / 2


def repo_views(model, image, crop_size, base_size, scales=(1.0,), flip=False, amp=False, window_batch=None):
    """Protocol 'repo' for one image (1×3×H×W normalised): each scale resizes the long side to scale·base_size;
    the windows' logits there (with flip: averaged with their mirror images'), whose softmax at the image's
    size is averaged over the scales. → [View]"""
    _, _, h, w = image.shape
    views = []
    with torch.inference_mode(), torch.autocast(image.device.type, torch.bfloat16, enabled=amp):
        for scale in scales:
            long_side = int(base_size * scale + 0.5)
            size = (long_side, int(w * long_side / h + 0.5)) if h >= w else (int(h * long_side / w + 0.5), long_side)
            resized = F.interpolate(image, size, mode="bilinear", align_corners=False)
            logits = sliding_window_logits(model, resized, crop_size, flip, window_batch)
            views.append(View(logits, False, True, 1 / len(scales)))
    return views


def predict(model, image, crop_size, base_size, scales=(1.0,), flip=False, amp=False, window_batch=None):
    """Protocol 'repo': class probabilities of one image (1×3×H×W normalised) at its resolution → 1×K×H×W."""
    views = repo_views(model, image, crop_size, base_size, scales, flip, amp, window_batch)
    return full_scores(views, image.shape[-2:])


# ----------------------------------------------------------------------------- protocol 'released'

def released_size(h, w, base_size, scale):
    """(height, width) of an h×w image at one scale, as MultiEvalModule.forward: long side
    ceil(base·scale), short side int(short·long/long_old + 0.5); a square counts as wide."""
    long_side = int(math.ceil(base_size * scale))
    if h > w:
        return long_side, int(1.0 * w * long_side / h + 0.5)
    return int(1.0 * h * long_side / w + 0.5), long_side


def released_pad(image, crop_size):
    """base.py pad_image: pad bottom and right up to crop_size where smaller, with −mean/std, the value a
    black pixel normalises to."""
    _, _, h, w = image.shape
    value = -torch.tensor(MEAN) / torch.tensor(STD)
    padded = value.to(image).view(1, 3, 1, 1).repeat(image.shape[0], 1, max(h, crop_size), max(w, crop_size))
    padded[:, :, :h, :w] = image
    return padded


def released_windows(height, width, crop_size):
    """MultiEvalModule.forward's grid: (y0, y1, x0, x1) from 0 at stride int(crop·2/3), ceil((size−crop)/
    stride) + 1 per axis, each window clipped at the border (and later padded back to the crop)."""
    stride = int(crop_size * (2.0 / 3.0))
    rows = int(math.ceil(1.0 * (height - crop_size) / stride)) + 1
    cols = int(math.ceil(1.0 * (width - crop_size) / stride)) + 1
    return [(i * stride, min(i * stride + crop_size, height), j * stride, min(j * stride + crop_size, width))
            for i in range(rows) for j in range(cols)]


def released_fusion(logits, mirrored):
    """base.py module_inference: a window's score is exp(logits(x) + flip(logits(flip(x))))."""
    return (logits if mirrored is None else logits + mirrored).exp()


def released_views(model, image, crop_size, base_size, scales=MULTI_SCALES, flip=True, amp=False,
                   window_batch=None):
    """Protocol 'released', base.py MultiEvalModule.forward for one normalised image 1×3×H×W: per scale the
    windows' scores exp(logits + mirrored logits), summed at the original resolution (their argmax is the
    prediction; they are sums of exp(logits), not probabilities). → [View]"""
    _, _, h, w = image.shape
    views = []
    with torch.inference_mode(), torch.autocast(image.device.type, torch.bfloat16, enabled=amp):
        for scale in scales:
            height, width = released_size(h, w, base_size, scale)
            resized = F.interpolate(image, (height, width), mode="bilinear", align_corners=True)
            # one branch for both cases of the source: an image within the crop is padded to one window
            padded = released_pad(resized, crop_size)
            _, _, ph, pw = padded.shape
            boxes = released_windows(ph, pw, crop_size)
            windows = torch.cat([released_pad(padded[:, :, y0:y1, x0:x1], crop_size) for y0, y1, x0, x1 in boxes])
            outputs = stitch_windows(model, windows, boxes, ph, pw, flip, released_fusion, window_batch)
            views.append(View(outputs[:, :, :height, :width], True, False))
    return views


def predict_released(model, image, crop_size, base_size, scales=MULTI_SCALES, flip=True, amp=False,
                     window_batch=None):
    """Protocol 'released': the scores of one normalised image, 1×3×H×W → 1×K×H×W."""
    views = released_views(model, image, crop_size, base_size, scales, flip, amp, window_batch)
    return full_scores(views, image.shape[-2:])


# ----------------------------------------------------------------------------- protocols 'mmseg', 'mmseg-ms'

def opencv_resize(image, size):
    """mmcv's Resize of the image that a normalised 1×3×H×W image was made from → the resized image, normalised.

    mmsegmentation resizes the uint8 image with cv2.resize(INTER_LINEAR) before normalising: its pixel levels are
    recovered exactly (normalising moves a level by far less than ½), resized as OpenCV does, bit for bit
    (cv_resize.resize_linear), and normalised again."""
    mean = torch.tensor(MEAN).to(image).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).to(image).view(1, 3, 1, 1) * 255
    pixels = (image * std + mean).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
    resized = torch.from_numpy(cv_resize.resize_linear(pixels, size)).permute(2, 0, 1)[None]
    return normalize(resized.to(image.device)).to(image.dtype)


def mmseg_views(model, image, box, ratios=(1.0,), flip=False, amp=False):
    """Protocols 'mmseg' / 'mmseg-ms' (mmseg/models/segmentors/encoder_decoder.py whole_inference, inference,
    aug_test; 0.x MultiScaleFlipAug: box·ratio): softmax probabilities averaged over the ratios and flips
    (a mirrored view's logits are flipped back first: bilinear resizing commutes with the flip). → [View]"""
    _, _, h, w = image.shape
    views = []
    with torch.inference_mode(), torch.autocast(image.device.type, torch.bfloat16, enabled=amp):
        for ratio in ratios:
            size = cv_resize.rescale_size(h, w, (int(box[0] * ratio), int(box[1] * ratio)))
            resized = image if size == (h, w) else opencv_resize(image, size)
            for mirror in (False, True) if flip else (False,):
                logits = model(resized.flip(-1) if mirror else resized).float()
                views.append(View(logits.flip(-1) if mirror else logits, False, True))
    return [view._replace(weight=1 / len(views)) for view in views]


def predict_mmseg(model, image, box, ratios=(1.0,), flip=False, amp=False):
    """Protocols 'mmseg' / 'mmseg-ms': class probabilities of one normalised image, 1×3×H×W → 1×K×H×W."""
    return full_scores(mmseg_views(model, image, box, ratios, flip, amp), image.shape[-2:])


def make_predictor(protocol, crop_size, base_size, dataset, amp=False, window_batch=None):
    """→ fn(model, image 1×3×H×W normalised) → [View] whose class_map is the protocol's prediction.
    protocol: 'repo', 'repo-ms', 'released', 'mmseg', 'mmseg-ms'; dataset: the name the scales depend on."""
    if protocol in ("repo", "repo-ms"):
        scales, flip = (MULTI_SCALES, True) if protocol == "repo-ms" else ((1.0,), False)
        return partial(repo_views, crop_size=crop_size, base_size=base_size, scales=scales, flip=flip, amp=amp,
                       window_batch=window_batch)
    if protocol == "released":
        return partial(released_views, crop_size=crop_size, base_size=base_size, amp=amp,
                       scales=RELEASED_SCALES.get(dataset, MULTI_SCALES), window_batch=window_batch)
    if dataset not in MMSEG_TEST_BOX:
        raise UserError(f"--protocol {protocol}: mmsegmentation has no EncNet test setting for {dataset!r} "
                             f"(known: {', '.join(MMSEG_TEST_BOX)})")
    multi = protocol == "mmseg-ms"
    return partial(mmseg_views, box=MMSEG_TEST_BOX[dataset], ratios=MULTI_SCALES if multi else (1.0,),
                   flip=multi, amp=amp)




def eval_crop(crop_size, base_size):
    """The window of whole-image evaluation for a model trained on `crop_size` crops: the crop itself; after
    non-square crops (Cityscapes' 512×1024) the whole image at base size, as mmsegmentation evaluates it."""
    return crop_size if isinstance(crop_size, int) else base_size


# ----------------------------------------------------------------------------- one call: an image → its classes

def default_protocol(info, dataset=None):
    """The protocol a model is used with when none is named (segment, eval.py): the model's own. A train_seg.py
    checkpoint's is its final evaluation's (args['protocol']); mmsegmentation's files 'mmseg' (single-scale);
    the authors' files and anything else 'repo' (their own protocol is multi-scale only: --protocol released
    asks for it); 'repo' also where mmsegmentation has no test setting for the dataset (your own data)."""
    info = info or {}
    own = {"mmseg": "mmseg", "train_seg": (info.get("args") or {}).get("protocol")}.get(info.get("format")) or "repo"
    if own == "mmseg" and (dataset or info.get("dataset")) not in MMSEG_TEST_BOX:
        return "repo"
    return own


def rgb_photo(image):
    """A PIL image as RGB: 16-bit images scaled to 8 bits (Pillow's own conversion would clip them to white);
    32-bit integer or floating-point images, which have no photo's range, refused (ValueError): transforms.to_rgb,
    the conversion of every image read."""
    return to_rgb(image)


def normalised_image(image):
    """What segment takes → 1×3×H×W float32, ImageNet-normalised: a PIL image, an H×W×3 uint8 NumPy array (RGB),
    a 3×H×W (or 1×3×H×W) uint8 tensor (RGB), or a float tensor 1×3×H×W (or 3×H×W) already normalised."""
    if isinstance(image, Image.Image):
        image = np.asarray(rgb_photo(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"segment: a NumPy image must be H×W×3 uint8 RGB, not {image.shape} {image.dtype}")
        image = torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1)  # a copy: the caller's stays theirs
    if not torch.is_tensor(image):
        raise TypeError(f"segment: an image is a PIL image, a NumPy array or a tensor, not {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or tuple(image.shape[:2]) != (1, 3):
        raise ValueError(f"segment: one RGB image, 3×H×W or 1×3×H×W, not {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return normalize(image)
    if not image.is_floating_point():
        raise ValueError(f"segment: a tensor image is uint8 (0..255) or normalised float, not {image.dtype}")
    return image.float()


def segment(model, image, info=None, protocol=None, scores=False, *, crop_size=None, base_size=None, dataset=None,
            amp=False, window_batch=None):
    """The class of every pixel of one image: H×W int64 class indices on the CPU (eval.py --images calls this).

        model, info = zoo.load_model("encnet_resnet50s_ade")
        classes = protocols.segment(model, Image.open("photo.jpg"), info)   # info["classes"][classes[y, x]]

    image: a PIL image (any mode, as RGB; for a phone photo apply PIL.ImageOps.exif_transpose first, as eval.py
    does, or the map follows the stored pixels), an H×W×3 uint8 NumPy array, a 3×H×W uint8 tensor, or a
    1×3×H×W float tensor already normalised (transforms.normalize). It goes to the model's device and dtype.
    info: zoo.load_model's (default: `model.info`, which torch.hub's models carry); its crop_size, base_size
    and dataset, unless given here. protocol: 'repo', 'repo-ms', 'released', 'mmseg' or 'mmseg-ms' (see the
    top of this file); default: the model's own (default_protocol). scores=True: (classes, the protocol's
    1×K×H×W scores at full resolution, on the CPU: probabilities for repo and mmseg, sums of exp(logits) for
    released); without it no full-resolution score map is ever made (class_map works a band of rows at a time).
    The model runs in eval mode (its mode is restored afterwards). amp, window_batch: as eval.py's flags."""
    info = info if info is not None else getattr(model, "info", None)
    if info is None and (crop_size is None or base_size is None):
        raise ValueError("segment: pass the model's info (zoo.load_model returns it with the model), or crop_size "
                         "and base_size")
    info = info or {}
    protocol = protocol or default_protocol(info, dataset)
    if protocol not in (*PROTOCOLS, "repo-ms"):
        raise ValueError(f"segment: protocol {protocol!r} is none of {', '.join((*PROTOCOLS, 'repo-ms'))}")
    predictor = make_predictor(protocol, crop_size or info["crop_size"], base_size or info["base_size"],
                               dataset or info.get("dataset"), amp, window_batch)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    normalised = normalised_image(image).to(device=device, dtype=dtype)
    training = model.training
    model.eval()
    try:
        views = predictor(model, normalised)
    finally:
        model.train(training)
    size = tuple(normalised.shape[-2:])
    classes = class_map(views, size).cpu()
    return (classes, full_scores(views, size).cpu()) if scores else classes
