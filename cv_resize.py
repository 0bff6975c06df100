"""OpenCV's resize of uint8 images (INTER_LINEAR) and label maps (INTER_NEAREST), bit for bit, in NumPy.

mmsegmentation resizes images through mmcv, i.e. ``cv2.resize(img, (new_w, new_h),
interpolation=cv2.INTER_LINEAR)`` on uint8 H x W x C arrays, and label maps with
``cv2.INTER_NEAREST``.  ``F.interpolate(bilinear)`` followed by rounding differs from
that by one grey level in roughly a tenth of the values, because OpenCV does the
arithmetic in 11-bit fixed point with truncating shifts.  This module reproduces that
arithmetic exactly, with vectorised NumPy, so no OpenCV is needed at run time.

Source read (opencv/opencv, 4.x/5.x): ``modules/imgproc/src/resize.cpp`` -- functions
``cv::resize``, ``cv::hal::resize``, ``resizeGeneric_`` / ``resizeGeneric_Invoker``,
``HResizeLinear`` + ``HResizeLinearVecU8_X4`` (= ``HResizeLinearVec_8u32s``), the
specialisation ``VResizeLinear<uchar, int, short, FixedPtCast<int, uchar,
INTER_RESIZE_COEF_BITS*2>, VResizeLinearVec_32s8u>`` + ``VResizeLinearVec_32s8u``,
``resizeAreaFast_Invoker`` + ``ResizeAreaFastVec`` + ``ResizeAreaFastVec_SIMD_8u``,
``resizeNN`` / ``resizeNNInvoker`` (and ``resize.avx2.cpp``, same offsets); and
``hal/ipp/src/resize_ipp.cpp`` (``ipp_hal_resize``).  Checked bit for bit against
cv2 5.1.0 (x86-64, IPP build) by the tests.

Which code path cv2.resize takes for uint8
------------------------------------------
* ``dsize == ssize``: plain copy (``cv::resize``).
* The IPP HAL declines 8U INTER_LINEAR and every INTER_NEAREST unless
  ``cv::ipp::useIPP_NotExact()`` (false by default), so the generic C++ code runs.
  INTER_LINEAR is *not* the bit-exact ``resize_bitExact`` path (that one is
  INTER_LINEAR_EXACT, 8-bit ``ufixedpoint16`` coefficients); it is
  ``resizeGeneric_`` with 11-bit ``short`` coefficients, described below.
* ``inv_scale = dst/src`` (double), ``scale = 1./inv_scale``.  If both scales are
  within DBL_EPSILON of the integer 2 (``is_area_fast`` with ``iscale_x ==
  iscale_y == 2``, i.e. src = 2*dst in both axes) INTER_LINEAR is switched to
  INTER_AREA, ``resizeAreaFast_``: each output is the 2x2 block sum ``s``;
  for 1, 3 or 4 channels ``(s + 2) >> 2`` (``ResizeAreaFastVec``, SIMD and scalar
  alike), for other channel counts ``saturate_cast<uchar>(s * 0.25f)`` = round half
  to even.  Other integer factors (3x, 4x, 2x in one axis only) stay bilinear.

Bilinear arithmetic (``cv::hal::resize`` coefficient loop + ``resizeGeneric_``)
------------------------------------------------------------------------------
1. Coefficients, per output column ``dx`` (rows ``dy`` alike):
   ``fx = (float)((dx + 0.5) * scale_x - 0.5)`` (double product, rounded to float32),
   ``sx = floor(fx)``, ``fx -= sx`` (float32).  Columns only: if ``sx < 0`` then
   ``sx = 0, fx = 0``; if ``sx >= src_w - 1`` then ``sx = src_w - 1, fx = 0``.
   Rows are NOT clamped that way: ``sy`` may be -1 or ``src_h - 1`` with a non-zero
   ``fy``; the two source rows are ``clip(sy, 0, h-1)`` and ``clip(sy+1, 0, h-1)``.
   ``a0 = saturate_cast<short>((1.f - fx) * 2048)``, ``a1 = saturate_cast<short>(fx * 2048)``
   (``INTER_RESIZE_COEF_BITS = 11``, ``INTER_RESIZE_COEF_SCALE = 2048``; cvRound =
   round half to even).  ``a0 + a1`` is 2048 up to rare +-1.
2. Horizontal pass (``HResizeLinear<uchar, int, short, 2048>``), exact int32:
   ``H = S[sx] * a0 + S[sx + 1] * a1`` per channel (clamped columns give
   ``S[sx] * 2048``).  The SIMD variant computes the same integers.
3. Vertical pass (``VResizeLinear`` uchar specialisation; scalar tail and
   ``VResizeLinearVec_32s8u`` SIMD agree):
   ``out = (((b0 * (H0 >> 4)) >> 16) + ((b1 * (H1 >> 4)) >> 16) + 2) >> 2``
   with arithmetic (flooring) shifts, i.e. a 16-bit ``mul_hi`` of the 4-bit
   pre-shifted row sums, then a rounding shift by 2; saturated to [0, 255].
   (Not the textbook ``(H0*b0 + H1*b1 + 2**21) >> 22`` of ``FixedPtCast``.)

Nearest (``resizeNN``)
----------------------
``ifx = 1./(dst_w/src_w)`` (double), ``sx = min(floor(dx * ifx), src_w - 1)``,
likewise ``sy``; output ``= src[sy, sx]``.  Pure copies, so any dtype works.  This
is INTER_NEAREST (mmcv 'nearest'), not INTER_NEAREST_EXACT (pixel-centre rule).
"""

import numpy as np

__all__ = ["resize_linear", "resize_nearest", "rescale_size"]

INTER_RESIZE_COEF_BITS = 11
INTER_RESIZE_COEF_SCALE = 1 << INTER_RESIZE_COEF_BITS
_DBL_EPSILON = float(np.finfo(np.float64).eps)


def _check_size(size):
    if len(size) != 2:
        raise ValueError(f"size must be (new_h, new_w), got {size!r}")
    new_h, new_w = int(size[0]), int(size[1])
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return new_h, new_w


def rescale_size(h, w, box):
    """The size mmcv's Resize(keep_ratio=True) hands to cv2.resize (mmcv.rescale_size): the largest within box
    (long, short) keeping the ratio → (height, width), each side int(side·factor + 0.5)."""
    factor = min(max(box) / max(h, w), min(box) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _check_window(window, dst_h, dst_w):
    """(top, bottom, left, right) of the output to compute, inside it and not empty; None: all of it."""
    if window is None:
        return 0, dst_h, 0, dst_w
    top, bottom, left, right = (int(v) for v in window)
    if not (0 <= top < bottom <= dst_h and 0 <= left < right <= dst_w):
        raise ValueError(f"window {tuple(window)} is not a non-empty part of the {dst_h}x{dst_w} output")
    return top, bottom, left, right


def _linear_tab(src_len, dst_len, clamp):
    """Source index and (a0, a1) 11-bit coefficients as in cv::hal::resize."""
    inv_scale = float(dst_len) / float(src_len)
    scale = 1.0 / inv_scale
    d = np.arange(dst_len, dtype=np.float64)
    f = ((d + 0.5) * scale - 0.5).astype(np.float32)  # (float)((dx+0.5)*scale_x - 0.5)
    s = np.floor(f)
    f = f - s                                          # fx -= sx (exact in float32)
    s = s.astype(np.int64)
    if clamp:
        left = s < 0
        f[left] = 0
        s[left] = 0
        right = s >= src_len - 1
        f[right] = 0
        s[right] = src_len - 1
    one = np.float32(1.0)
    coef_scale = np.float32(INTER_RESIZE_COEF_SCALE)
    a0 = np.rint((one - f) * coef_scale).astype(np.int32)  # saturate_cast<short>(cbuf*2048)
    a1 = np.rint(f * coef_scale).astype(np.int32)
    return s, a0, a1


def _is_area_fast_2x(src_h, src_w, dst_h, dst_w):
    scale_x = 1.0 / (float(dst_w) / float(src_w))
    scale_y = 1.0 / (float(dst_h) / float(src_h))
    iscale_x = int(np.rint(scale_x))  # saturate_cast<int>(double) = cvRound
    iscale_y = int(np.rint(scale_y))
    return (abs(scale_x - iscale_x) < _DBL_EPSILON and abs(scale_y - iscale_y) < _DBL_EPSILON
            and iscale_x == 2 and iscale_y == 2)


def _area_2x(img, dst_h, dst_w):
    x = img[: 2 * dst_h, : 2 * dst_w].astype(np.int32)
    s = x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]
    cn = img.shape[2]
    if cn in (1, 3, 4):
        out = (s + 2) >> 2
    else:  # scalar resizeAreaFast_Invoker: saturate_cast<uchar>(sum * 0.25f)
        out = np.rint(s.astype(np.float32) * np.float32(0.25)).astype(np.int32)
    return out.astype(np.uint8)


def resize_linear(image, size, window=None):
    """``cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)`` for uint8.

    image: H x W x C (any C >= 1) or H x W uint8 array.  size: (new_h, new_w).
    window: (top, bottom, left, right) to compute only ``out[top:bottom, left:right]`` of the resized image
    (each output pixel has its own coefficients, so a window is the same bits for less work: a training crop).
    Returns a new uint8 array of shape new_h x new_w (x C), or the window's shape.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"resize_linear expects uint8, got {image.dtype}")
    if image.ndim not in (2, 3):
        raise ValueError(f"expected H x W or H x W x C, got shape {image.shape}")
    dst_h, dst_w = _check_size(size)
    top, bottom, left, right = _check_window(window, dst_h, dst_w)
    squeeze = image.ndim == 2
    img = image[:, :, None] if squeeze else image
    src_h, src_w, cn = img.shape
    if src_h == 0 or src_w == 0 or cn == 0:
        raise ValueError(f"empty image of shape {image.shape}")

    if (dst_h, dst_w) == (src_h, src_w):
        out = img[top:bottom, left:right].copy()
    elif _is_area_fast_2x(src_h, src_w, dst_h, dst_w):  # each output pixel is its own 2×2 block
        out = _area_2x(img[2 * top:2 * bottom, 2 * left:2 * right], bottom - top, right - left)
    else:
        sx, a0, a1 = (t[left:right] for t in _linear_tab(src_w, dst_w, clamp=True))
        sx1 = np.minimum(sx + 1, src_w - 1)
        sy, b0, b1 = (t[top:bottom] for t in _linear_tab(src_h, dst_h, clamp=False))
        r0 = np.clip(sy, 0, src_h - 1)
        r1 = np.clip(sy + 1, 0, src_h - 1)
        rows, inverse = np.unique(np.concatenate([r0, r1]), return_inverse=True)
        i0, i1 = inverse[:len(sy)], inverse[len(sy):]

        # horizontal pass on the needed source rows only: exact int32
        src = img[rows]
        h = src[:, sx, :].astype(np.int32)
        h *= a0[None, :, None]
        t = src[:, sx1, :].astype(np.int32)
        t *= a1[None, :, None]
        h += t
        h >>= 4                                   # v_shr<4> before the 16-bit mul_hi

        # vertical pass: ((b0*(H0>>4))>>16) + ((b1*(H1>>4))>>16), then (+2)>>2
        out = h[i0]
        out *= b0[:, None, None]
        out >>= 16
        t = h[i1]
        t *= b1[:, None, None]
        t >>= 16
        out += t
        out += 2
        out >>= 2
        np.clip(out, 0, 255, out=out)
        out = out.astype(np.uint8)
    return out[:, :, 0] if squeeze else out


def resize_nearest(label, size, window=None):
    """``cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)``.

    label: H x W (or H x W x C) array of any dtype (integer labels expected).
    size: (new_h, new_w); window: as resize_linear's.  Returns the same dtype, shape new_h x new_w (x C)
    or the window's.
    """
    label = np.asarray(label)
    if label.ndim not in (2, 3):
        raise ValueError(f"expected H x W or H x W x C, got shape {label.shape}")
    dst_h, dst_w = _check_size(size)
    top, bottom, left, right = _check_window(window, dst_h, dst_w)
    src_h, src_w = label.shape[:2]
    if src_h == 0 or src_w == 0:
        raise ValueError(f"empty label map of shape {label.shape}")
    if (dst_h, dst_w) == (src_h, src_w):
        return label[top:bottom, left:right].copy()
    ifx = 1.0 / (float(dst_w) / float(src_w))
    ify = 1.0 / (float(dst_h) / float(src_h))
    sx = np.minimum(np.floor(np.arange(left, right, dtype=np.float64) * ifx).astype(np.int64), src_w - 1)
    sy = np.minimum(np.floor(np.arange(top, bottom, dtype=np.float64) * ify).astype(np.int64), src_h - 1)
    return label[sy[:, None], sx[None, :]]
