"""Train-time augmentation of segmentation samples, and the normalisation every model input gets.

    augment_train           the released code's flip → scale → rotate → pad → crop as ONE affine warp per sample;
                            its scale rules ('long', 'short') and mmsegmentation's RandomResize ('box')
    crop_is_varied          mmsegmentation's RandomCrop rule (cat_max_ratio)
    photometric_distortion  mmsegmentation's PhotoMetricDistortion
    center_crop             the quick validation's resize-and-cut
    normalize               uint8 → normalised float32, on the device after the transfer (a quarter of the bytes)
    eight_bit, to_rgb       the one conversion of every image read: 16-bit scaled to 8 bits, 32-bit refused

Every random number comes from the rng the caller passes (data.py seeds it per item): an augmented sample
depends only on (seed, epoch, index).
"""
import math

import numpy as np
import torch
from PIL import Image, ImageFilter

import cv_resize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as the pretrained backbones expect


def normalize(images, mean=MEAN, std=STD):
    """B×3×H×W uint8 → float32 (x/255 − mean)/std on images' device, keeping channels_last if it has it."""
    mean = torch.tensor(mean, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(std, device=images.device).view(3, 1, 1) * 255
    return images.float().sub_(mean).div_(std)  # .float() and in-place ops preserve the memory format


def crop_shape(crop_size):
    """crop_size as (height, width): an int n means n×n."""
    if isinstance(crop_size, (int, np.integer)):
        return int(crop_size), int(crop_size)
    height, width = crop_size
    return int(height), int(width)


def augment_train(image, label, rng, crop_size, base_size, scale_range=(0.5, 2.0), max_rotation=10.0,
                  label_fill=255, cat_max_ratio=None, label_classes=None, photometric=False, scale_rule="long",
                  scale_box=None, blur=False, image_fill=0):
    """The released code's random flip → scale → rotate → pad → crop, as one affine warp into the crop.

    image: PIL RGB image W×H (if it is a JPEG opened but not yet loaded, it is decoded at 1/2, 1/4 or 1/8
    size when the sampled scale allows; the matrix accounts for it). label: PIL 'L' of raw dataset values, W×H.
    crop_size: n (n×n) or (height, width). Returns the crop image (padding and rotated-away corners 0) and
    label (those label_fill), both PIL of width×height crop_size. image_fill: the padding's grey level or RGB.
    Warping only the output pixels skips resizing and rotating the whole scaled image (up to 1040×780).
    Shrinking is plain bilinear sampling, without the anti-aliasing filter of PIL's resize (like torch's
    interpolate), apart from the block averaging a reduced JPEG decode does.

    scale_rule: how the random scale is drawn.
        'long'  the released code's final revision: the long side a random integer in scale_range × base_size
                (both ends included), the short side rounded, aspect kept;
        'short' its revision that trained the published models (v0.5.0): the short side drawn so, the long
                side truncated (int());
        'box'   mmsegmentation's RandomResize(scale_box, ratio_range, keep_ratio=True): r ~ U(scale_range), the
                image resized by the largest factor that fits it into int(long·r) × int(short·r) of
                scale_box = (long, short) (mmcv's rescale_size, sides rounded), with OpenCV's bilinear (labels:
                nearest) on the whole image as mmcv does, bit for bit (cv_resize).
    blur: a Gaussian blur of radius U(0, 1) on the crop's image with probability ½ (released v0.5.0).

    Options of mmsegmentation's recipes (off by default):
    cat_max_ratio: redraw the crop's offset (only the offset) while one class covers cat_max_ratio or more of
        the crop's labelled pixels, or fewer than two classes are present: up to 10 checks, then the 11th
        offset is taken unchecked, as mmsegmentation's RandomCrop does. label_classes: 256-entry table raw
        value → class, −1 = ignored, for that count (default: every raw value but label_fill is a class).
    photometric: photometric_distortion of the warped image; padding and rotated-away corners stay 0
        (mmsegmentation pads after its distortion).
    """
    w, h = image.size
    crop_h, crop_w = crop_shape(crop_size)
    flip = rng.random() < 0.5
    # Long side U(0.5, 2)·base_size. For Cityscapes (2048×1024) with base_size 2048 this is mmsegmentation's
    # RandomResize(scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True): the factor it draws, r,
    # makes the image 2048r × 1024r, as here (which draws the long side in whole pixels).
    if scale_rule == "box":
        ratio = rng.uniform(*scale_range)
        box_long, box_short = int(max(scale_box) * ratio), int(min(scale_box) * ratio)
        sh, sw = cv_resize.rescale_size(h, w, (box_long, box_short))
        # mmcv resizes the whole image with OpenCV (bilinear; labels nearest) before cropping: done here bit for
        # bit, so that the warp below only flips and crops (integer translations: exact copies of pixels). The
        # label is resized whole (crops are chosen on it), the image only where the chosen crop reads it (below)
        pixels = np.asarray(image.convert("RGB"))
        label = Image.fromarray(cv_resize.resize_nearest(np.asarray(label), (sh, sw)))
        w, h = sw, sh
    else:
        side = int(rng.integers(int(base_size * scale_range[0]), int(base_size * scale_range[1]), endpoint=True))
        if scale_rule == "long":  # long side = side, aspect kept, short side rounded
            sw, sh = (int(w * side / h + 0.5), side) if h > w else (side, int(h * side / w + 0.5))
        else:  # "short": short side = side, long side truncated
            sw, sh = (side, int(h * side / w)) if h > w else (int(w * side / h), side)
    angle = math.radians(rng.uniform(-max_rotation, max_rotation))

    # Inverse map, output → input, in continuous coordinates where pixel i spans [i, i+1): Pillow's affine
    # transform samples the input at M·(x+½, y+½), so an integer translation is an exact crop.
    cx, cy, c, s = sw / 2, sh / 2, math.cos(angle), math.sin(angle)
    # PIL's rotate(deg) turns the content counter-clockwise about the centre; its inverse is this rotation
    unrotate = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1]])
    unscale = np.diag([w / sw, h / sh, 1.0])
    unflip = np.array([[-1, 0, w], [0, 1, 0], [0, 0, 1]], float) if flip else np.eye(3)
    size = (crop_w, crop_h)  # Pillow's order

    def random_crop():
        """(matrix, warped label) of a random crop window in the scaled image padded right/bottom to the crop."""
        x1 = int(rng.integers(0, max(sw, crop_w) - crop_w, endpoint=True))
        y1 = int(rng.integers(0, max(sh, crop_h) - crop_h, endpoint=True))
        crop = np.array([[1, 0, x1], [0, 1, y1], [0, 0, 1]], float)
        matrix = unflip @ unscale @ unrotate @ crop
        return matrix, label.transform(size, Image.Transform.AFFINE, tuple(matrix[:2].ravel()),
                                       Image.Resampling.NEAREST, fillcolor=label_fill)

    matrix, out_label = random_crop()
    if cat_max_ratio is not None:
        if label_classes is None:
            label_classes = np.arange(256)
            label_classes[label_fill] = -1
        for _ in range(10):
            if crop_is_varied(label_classes[np.asarray(out_label)], cat_max_ratio):
                break
            matrix, out_label = random_crop()

    if scale_rule == "box":
        image, image_matrix = resized_window(pixels, (sh, sw), matrix, size)
    else:
        reduced = image.draft(None, (sw, sh))  # JPEG only, before decoding: (mode, box of the original in it)
        factor = w / reduced[1][2] if reduced else 1.0
        image_matrix = np.diag([1 / factor, 1 / factor, 1.0]) @ matrix
    out = image.convert("RGB").transform(size, Image.Transform.AFFINE, tuple(image_matrix[:2].ravel()),
                                         Image.Resampling.BILINEAR, fillcolor=image_fill)
    if photometric:
        # the output pixels whose source lies inside the image (the label's nearest-neighbour rule)
        inside = Image.new("L", (w, h), 1).transform(size, Image.Transform.AFFINE, tuple(matrix[:2].ravel()),
                                                     Image.Resampling.NEAREST, fillcolor=0)
        pixels = np.asarray(out)
        distorted = photometric_distortion(pixels, rng)
        out = Image.fromarray(np.where(np.asarray(inside, bool)[..., None], distorted, pixels))
    if blur and rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.random()))
    return out, out_label


def resized_window(pixels, size, matrix, crop_wh):
    """The part of cv_resize.resize_linear(pixels, size) that an affine warp of `matrix` (output → input, the
    resized image's coordinates) into a crop of crop_wh samples, 2 pixels wider on each side than its taps reach,
    → (PIL image of it, the matrix into it). The same crop as from the whole resized image, for less work."""
    crop_w, crop_h = crop_wh
    xs, ys, _ = matrix @ np.array([[0, crop_w, 0, crop_w], [0, 0, crop_h, crop_h], [1, 1, 1, 1]], float)

    def span(v, n):  # [first, last) of the n pixels, covering v's range and the taps, never empty
        first = min(max(math.floor(v.min()) - 2, 0), n - 1)
        return first, max(min(math.ceil(v.max()) + 2, n), first + 1)
    (top, bottom), (left, right) = span(ys, size[0]), span(xs, size[1])
    shift = np.array([[1, 0, -left], [0, 1, -top], [0, 0, 1]], float)
    return Image.fromarray(cv_resize.resize_linear(pixels, size, (top, bottom, left, right))), shift @ matrix


# Padding colours of training crops: black (the released code pads the image with 0 before normalising) or the
# ImageNet mean in whole pixel levels, which normalises to 0 within half a level (mmsegmentation pads the
# normalised image with exactly 0, i.e. the mean colour).
PAD_COLOURS = {"black": (0, 0, 0), "mean": tuple(int(m * 255 + 0.5) for m in MEAN)}


def crop_is_varied(classes, cat_max_ratio):
    """mmsegmentation's RandomCrop test: ≥ 2 classes and none with cat_max_ratio of the labelled pixels.

    classes: int array of class indices, −1 = ignored (not counted).
    """
    counts = np.bincount(classes[classes >= 0].ravel())
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() < cat_max_ratio * counts.sum()


# ----------------------------------------------------------------------------------------------
# Photometric distortion (mmsegmentation's PhotoMetricDistortion)

def photometric_distortion(pixels, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmsegmentation's PhotoMetricDistortion of an H×W×3 uint8 RGB array → a new H×W×3 uint8 array.

    Each step happens with probability ½ (a coin, then its value, both from rng), in mmsegmentation's order:
      1. brightness: add U(−brightness_delta, brightness_delta)
      2. a coin decides whether contrast comes here or last; contrast: multiply by U(contrast_range)
      3. saturation: multiply HSV's S by U(saturation_range), S clipped to 1
      4. hue: rotate H by 2k degrees, k an integer in −hue_delta..hue_delta−1 (mmsegmentation's H is OpenCV's
         8-bit hue in 2° units, and numpy's randint excludes its upper end)
      5. contrast, if the coin of step 2 put it here
    Every step maps uint8 → uint8 as there: brightness and contrast in float32, clipped to 0..255 and
    truncated; saturation and hue through HSV and back, rounded. The HSV here is float; OpenCV's 8-bit HSV,
    which mmsegmentation uses, also quantises H to 2° and S to 1/255 (a level or two of difference).
    """
    def affine(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)  # astype truncates

    def contrast(x):
        if rng.integers(2):
            return affine(x, alpha=rng.uniform(*contrast_range))
        return x

    if rng.integers(2):
        pixels = affine(pixels, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = rng.integers(2) == 0  # mmsegmentation's "mode 0"
    if not contrast_last:
        pixels = contrast(pixels)
    if rng.integers(2):
        hue, saturation, value = rgb_to_hsv(pixels)
        saturation = np.minimum(saturation * np.float32(rng.uniform(*saturation_range)), 1)
        pixels = hsv_to_rgb(hue, saturation, value)
    if rng.integers(2):
        hue, saturation, value = rgb_to_hsv(pixels)
        pixels = hsv_to_rgb((hue + 2 * int(rng.integers(-hue_delta, hue_delta))) % 360, saturation, value)
    if contrast_last:
        pixels = contrast(pixels)
    return pixels


def rgb_to_hsv(pixels):
    """H×W×3 uint8 RGB → float32 (hue in degrees [0, 360), saturation [0, 1], value [0, 255]), each H×W.

    The hexcone model: value = max channel, saturation = (max − min)/max, hue = the position of the colour
    on the six edges red → yellow → green → cyan → blue → magenta (grey: hue and saturation 0).
    """
    r, g, b = np.moveaxis(pixels, -1, 0).astype(np.float32)  # contiguous planes: 3× faster than strided
    value, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    chroma = value - low
    safe = np.where(chroma > 0, chroma, np.float32(1))  # grey: numerators are 0, so the hue comes out 0
    hue = (r - g) / safe + 4                            # blue is the largest: 180°..300°
    hue = np.where(value == g, (b - r) / safe + 2, hue)  # green: 60°..180°
    hue = np.where(value == r, (g - b) / safe, hue)      # red: −60°..60°
    hue *= 60
    hue[hue < 0] += 360
    saturation = chroma / np.where(value > 0, value, np.float32(1))
    return hue, saturation, value


def hsv_to_rgb(hue, saturation, value):
    """Inverse of rgb_to_hsv → H×W×3 uint8, rounded.

    Channel n (red 5, green 3, blue 1 on the hue wheel in 60° steps) is value·(1 − saturation·ramp), where
    ramp = clip(min(k, 4 − k), 0, 1) and k = (n + hue/60) mod 6: 0 where the channel is the largest, 1 where
    it is the smallest, linear between.
    """
    sixths = hue / 60
    out = np.empty(hue.shape + (3,), np.uint8)
    for channel, n in enumerate((5, 3, 1)):
        k = sixths + n
        k = np.where(k >= 6, k - 6, k)
        ramp = np.clip(np.minimum(k, 4 - k), 0, 1)
        out[..., channel] = np.clip(np.rint(value * (1 - saturation * ramp)), 0, 255)
    return out


def center_crop(image, label, size):
    """Resize so the image just covers the crop and cut the central crop (quick validation).

    size: n (n×n: the short side becomes n) or (height, width).
    """
    w, h = image.size
    crop_h, crop_w = crop_shape(size)
    if crop_w * h >= crop_h * w:  # the crop is relatively wider: the width decides the scale
        bw, bh = w, crop_h * w / crop_w
    else:
        bw, bh = crop_w * h / crop_h, h
    box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)  # in the original's coordinates
    return (image.resize((crop_w, crop_h), Image.Resampling.BILINEAR, box),
            label.resize((crop_w, crop_h), Image.Resampling.NEAREST, box))


def eight_bit(image):
    """A PIL image as a photo of 8 bits per channel, for .convert("RGB"): 16-bit images (modes I;16*) scaled to 8
    bits, v >> 8 (Pillow's own conversion would clip them to white); 32-bit integer ('I') or floating-point ('F')
    images, which have no photo's range, refused (ValueError). Every other image comes back as it is, not
    decoded: a JPEG opened but not yet loaded keeps its reduced decode (augment_train's draft)."""
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        raise ValueError(f"a {'32-bit integer' if image.mode == 'I' else 'floating-point'} image, not a photo of "
                         f"8 or 16 bits per channel: convert it first")
    return image


def to_rgb(image):
    """The one conversion of every image read (datasets, eval.py's photos, protocols.segment): eight_bit, as RGB."""
    return eight_bit(image).convert("RGB")


def image_tensor(image):
    """PIL RGB W×H → 3×H×W uint8 contiguous tensor."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


