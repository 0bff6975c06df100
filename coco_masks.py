"""COCO → PASCAL VOC labels (paper Sec. 3.3): the 20 categories, and COCO's masks rasterised as pycocotools does.

    CAT_LIST            VOC class → COCO category id, as in the released code
    CocoLabel           what one image's label is rasterised from (its annotations in VOC classes)
    coco_label          CocoLabel → H×W uint8 VOC-class label; where objects overlap the first one wins
    segmentation_mask   one COCO segmentation (polygons or RLE) → H×W bool, pixel for pixel pycocotools' annToMask

NumPy only: pycocotools is the tests' reference, not a dependency.
"""
import hashlib
import inspect
from pathlib import Path
from typing import NamedTuple

import numpy as np

from errors import DataError

# COCO → VOC. Index = VOC class, value = COCO category id, as in the released code.
CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
VOC_CLASS_OF_COCO = {cat: voc for voc, cat in enumerate(CAT_LIST) if voc > 0}


class CocoLabel(NamedTuple):
    """What a COCO label is rasterised from; str() names it for error messages."""
    annotation_file: Path
    image_id: int
    height: int
    width: int
    objects: list  # [(VOC class, COCO segmentation)] in the annotation file's order

    def __str__(self):
        return f"{self.annotation_file} (image id {self.image_id})"


def rle_string_counts(s):
    """Run lengths of COCO's compressed RLE string (pycocotools rleFrString).

    Each count is 5-bit groups, least significant first, in chars of 48 + 6 bits (bit 5 = more follow,
    bit 4 of the last = negative); from the fourth count on, each is stored minus the count two before.
    """
    counts, p = [], 0
    while p < len(s):
        x = k = 0
        while True:
            c = ord(s[p]) - 48
            x |= (c & 0x1f) << 5 * k
            p, k = p + 1, k + 1
            if not c & 0x20:
                if c & 0x10:
                    x -= 1 << 5 * k
                break
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


# COCO polygons are rasterised as pycocotools does (rleFrPoly in its maskApi.c), so that labels are pixel for
# pixel those of the released code and of every COCO tool: trace the outline on a 5× finer grid, keep the
# points where the traced outline crosses a pixel column's centre line, and fill each column between them.
# A pixel is in the mask when its centre is inside the polygon, up to the rounding of that fine grid; edge
# pixels whose centre lies outside are not (Pillow's ImageDraw.polygon also draws the outline: masks ~7% larger).
POLYGON_UPSAMPLE = 5
POLYGON_REACH = 16  # vertices further than this many image sizes away are damaged data, not a polygon


def polygon_walk(x, y):
    """Every point of the closed outline through integer vertices (x[i], y[i]), as pycocotools walks it.

    x, y: int64 arrays of the k vertices on the fine grid. Returns int64 arrays (u, v) of the walk: each edge
    contributes max(|dx|, |dy|) + 1 points, one per step of its longer axis, the other coordinate rounded
    half up; an edge starts where the previous one ended (the shared vertex appears twice).
    """
    xs, ys = x, y
    xe, ye = np.roll(x, -1), np.roll(y, -1)  # edge i runs from vertex i to vertex i+1, the last one back to 0
    dx, dy = np.abs(xe - xs), np.abs(ye - ys)
    along_x = dx >= dy  # step along x (one point per column) or along y
    # Each edge is computed from its end with the smaller stepping coordinate and then listed in walking
    # order: the points of an edge do not depend on the direction it is walked in.
    flip = np.where(along_x, xs > xe, ys > ye)
    x0, x1 = np.where(flip, xe, xs), np.where(flip, xs, xe)
    y0, y1 = np.where(flip, ye, ys), np.where(flip, ys, ye)
    steps = np.where(along_x, dx, dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(along_x, (y1 - y0) / dx, (x1 - x0) / dy)  # float64, as in the C code
    slope[steps == 0] = 0  # a zero-length edge: one point (C computes 0/0 there; its value is never used)

    edge = np.repeat(np.arange(len(x)), steps + 1)  # edge index of every walk point
    d = np.arange(len(edge)) - np.repeat(np.cumsum(steps + 1) - (steps + 1), steps + 1)  # step within its edge
    t = np.where(flip[edge], steps[edge] - d, d)
    # minor coordinate: C's (int)(a + s·t + .5) truncates towards zero, which is not rounding below 0
    minor = np.trunc(np.where(along_x[edge], y0[edge], x0[edge]) + slope[edge] * t + 0.5).astype(np.int64)
    u = np.where(along_x[edge], x0[edge] + t, minor)
    v = np.where(along_x[edge], minor, y0[edge] + t)
    return u, v


def polygon_boundaries(polygon, height, width):
    """Sorted positions x·height + y where one polygon's mask switches (pycocotools' polygon → RLE).

    polygon: [x1, y1, x2, y2, ...] in pixels (a trailing odd number is ignored, as pycocotools does).
    In column-major order (COCO's RLE order) the mask is on between the 1st and 2nd position, the 3rd and
    4th, ...; a position may repeat (an even number of repeats cancels). Positions lie in 0..height·width.
    """
    xy = np.asarray(polygon, np.float64).ravel()
    k = len(xy) // 2
    if k == 0:
        return np.zeros(0, np.int64)
    if not np.all(np.isfinite(xy)) or np.abs(xy).max() > POLYGON_REACH * max(height, width, 1):
        raise ValueError(f"polygon vertex outside ±{POLYGON_REACH}× the image size or not finite")
    scale = POLYGON_UPSAMPLE
    # vertices on the fine grid, rounded as C's (int)(v + .5)
    x = np.trunc(scale * xy[0:2 * k:2] + 0.5).astype(np.int64)
    y = np.trunc(scale * xy[1:2 * k:2] + 0.5).astype(np.int64)
    u, v = polygon_walk(x, y)

    # Where the walk moves to the next fine column it may cross the centre line of a pixel column: the fine
    # column boundary between c and c+1 is the centre of pixel column X when (c + .5)/scale − .5 = X.
    moved = np.flatnonzero(u[1:] != u[:-1]) + 1
    c = np.minimum(u[moved], u[moved - 1]).astype(np.float64)
    column = (c + 0.5) / scale - 0.5
    keep = (np.floor(column) == column) & (column >= 0) & (column <= width - 1)
    # the crossing's row: the first pixel row whose centre is at or below the walk there, clamped to the image
    row = (np.minimum(v[moved], v[moved - 1])[keep] + 0.5) / scale - 0.5
    row = np.ceil(np.clip(row, 0, height))
    return np.sort(column[keep].astype(np.int64) * height + row.astype(np.int64))


def fill_boundaries(flat, positions):
    """OR into flat (height·width bool, column-major) the runs between successive pairs of positions."""
    if positions.size == 0:
        return
    first, last = positions[0], positions[-1]
    # parity of the switches up to each pixel; only the span first..last can be on
    switches = np.bincount(positions - first, minlength=last - first + 1).astype(np.uint8)
    flat[first:last] |= (np.cumsum(switches[:-1], dtype=np.uint8) & 1).astype(bool)


def segmentation_mask(segmentation, height, width):
    """H×W bool mask of one COCO segmentation, pixel for pixel pycocotools' annToMask.

    segmentation: polygons [[x1, y1, x2, y2, ...], ...] (the union of the parts), or RLE {'counts': [run
    lengths] or compressed string, 'size': [h, w]}. A part of fewer than 3 points is rasterised as any other
    (pycocotools' polygon → RLE gives the same), where annToMask raises when the first part has ≤ 4 numbers.
    """
    if isinstance(segmentation, list):
        flat = np.zeros(height * width, bool)  # column-major, as RLE runs
        for polygon in segmentation:
            fill_boundaries(flat, polygon_boundaries(polygon, height, width))
        return flat.reshape(width, height).T
    counts = segmentation["counts"]
    counts = rle_string_counts(counts) if isinstance(counts, str) else counts
    runs = np.zeros(len(counts), bool)
    runs[1::2] = True  # runs alternate background, object, ... starting with background
    flat = np.repeat(runs, counts)
    if flat.size != height * width:
        raise ValueError(f"RLE covers {flat.size} pixels, the image has {height}×{width}")
    return flat.reshape(width, height).T  # RLE runs down the columns


def coco_label(source):
    """H×W uint8 VOC-class label of a CocoLabel; where objects overlap the first one wins (as released)."""
    label = np.zeros((source.height, source.width), np.uint8)
    try:
        for voc_class, segmentation in source.objects:
            label[segmentation_mask(segmentation, source.height, source.width) & (label == 0)] = voc_class
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise DataError(f"{source}: bad segmentation ({e})") from None
    return label


def coco_label_version():
    """Hash of the code that turns annotations into labels (a selection cached by other code is stale)."""
    code = "".join(inspect.getsource(f) for f in (rle_string_counts, polygon_walk, polygon_boundaries,
                                                  fill_boundaries, segmentation_mask, coco_label))
    return hashlib.sha1((code + repr((POLYGON_UPSAMPLE, CAT_LIST))).encode()).hexdigest()[:12]
