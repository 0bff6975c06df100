"""What the Context Encoding Module sees: codeword assignments, class presence, channel attention (Sec. 2, Fig. 2).

EncNet's Context Encoding Module (layers.EncModule, `model.enc_module`) reduces the stage-4 features
with a 1×1 conv-BN-ReLU, soft-assigns every position x_i to K codewords d_k (Eq. 1,
a_ik = softmax_k(−s_k‖x_i − d_k‖²)), aggregates the residuals into the encoded semantics e, and from e
predicts the featuremap attention γ = sigmoid(W e) (y = x ⊗ γ) and the SE head's class-presence logits.
This file makes the three visible for one trained (or untrained) model:

    module_view(model, images)      ModuleView of a normalised batch, read by forward hooks (model unchanged):
                                    assignments a_ik, presence sigmoid(se_logits), gamma γ, logits, prediction
    one_image(view, i)              the view of the i-th image of a batch
    draw_explanation(image, view_for_one_image, classes, palette, label=None)   one PIL picture
    explain_images(model, images, classes, palette, labels=None)             uint8 images → pictures
    tensorboard_views(view, classes=None, label=None, index=0)               3×H×W float images for add_image
    at_long_side(images, long_side) normalised images at protocol 'repo''s scale 1 (what eval.py --explain and
                                    train_seg.py's TensorBoard views feed module_view)
    save_explained_samples(model, path)   the README's figure: one validation panorama of each built-in scene
    assignment_colours(assignments) the assignment map: strongest codeword's colour, its weight as brightness

Used by eval.py --explain (one picture beside each prediction), train_seg.py (TensorBoard: val/assignment/i,
val/presence/i) and eval.py --explain-figure (the README's figure):

    python eval.py --checkpoint runs/seg/checkpoint.pth --explain-figure docs/explained.png

Imports only torch, numpy, Pillow, layers.py and context_data.py (the figure's panoramas).
"""
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor, ImageDraw, ImageFont

import context_data
from layers import Encoding

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as data.normalize and the backbones use


class ModuleView(NamedTuple):
    """What module_view reads, all on the CPU, detached. Batched (B…) or, after one_image, one image's."""
    logits: torch.Tensor       # B×num_classes×H×W, the model's eval output (float32, or float64 for such a model)
    prediction: torch.Tensor   # B×H×W int64, argmax of the logits
    assignments: torch.Tensor  # B×K×h×w float64, Eq. 1's a_ik at the Encoding layer's resolution (stride 8)
    presence: object           # B×num_classes sigmoid(se_logits), or None when the module has no SE classifier
    gamma: torch.Tensor        # B×C featuremap attention γ = sigmoid(W e)
    residual: bool             # the module outputs relu(x + x ⊗ γ) (released code) rather than x ⊗ γ (paper)


# ----------------------------------------------------------------------------- reading the module

def context_module(model):
    """The model's main Context Encoding Module, or a one-line ValueError saying why there is none."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):  # DDP / DataParallel / torch.compile
        model = getattr(model, "module", None) or model._orig_mod
    module = getattr(model, "enc_module", None)
    if module is None:
        raise ValueError(f"{type(model).__name__} has no Context Encoding Module (no enc_module): "
                         "nothing to explain")
    if module.encoding is None:  # layers.semantic_encoder returns None for K = 0
        raise ValueError(f"{type(model).__name__}'s Context Encoding Module has K = 0 codewords (global average "
                         "pooling instead of the Encoding layer): no codeword assignments to explain")
    return model, module


def soft_assignments(features, codewords, scale):
    """Eq. 1's weights a_ik = softmax_k(−s_k‖x_i − d_k‖²): B×C×h×w features → B×K×h×w, in float64.

    The same quantity layers._EncodingFunction computes (it keeps it internal); float64 makes the expanded
    distance ‖x‖² − 2x·d + ‖d‖² exact to ~1e-16·(‖x‖² + ‖d‖²), so the picture shows what the layer used."""
    x = features.detach().double().flatten(2)  # B×C×N
    d, s = codewords.detach().double(), scale.detach().double()
    dist = (x.square().sum(1, keepdim=True) - 2 * torch.matmul(d, x) + d.square().sum(1)[:, None]).clamp_min(0)
    return torch.softmax(-s[:, None] * dist, dim=1).reshape(x.shape[0], -1, *features.shape[2:])


def wide(dtype):
    """float32, or float64 for a float64 model: bf16/fp16 values are widened for drawing."""
    return torch.promote_types(dtype, torch.float32)


def module_view(model, images):
    """ModuleView of a normalised B×3×H×W batch: one eval forward with hooks on `model.enc_module`.

    Hooks (removed afterwards; every submodule's train/eval mode is restored):
      the Encoding layer (enc_module.encoding[0])  its input, i.e. reduce(x) after the conv-BN-ReLU, and the
                                                   codewords/scale it used → assignments (Eq. 1)
      enc_module.attention (the FC of Fig. 2)      W e → gamma = sigmoid(W e)
      enc_module.se_classifier                     se_logits → presence = sigmoid(se_logits)
    """
    model_inner, module = context_module(model)
    encoding = next(m for m in module.encoding.modules() if isinstance(m, Encoding))
    seen = {}

    def on_encoding(layer, inputs, output):  # read scale after the call: EncodingDrop sets it in forward
        seen["assignments"] = soft_assignments(inputs[0], layer.codewords, layer.scale)

    def sigmoid_of(name):  # the FC's output W e → sigmoid, kept in float64 for a float64 model
        return lambda m, inputs, out: seen.update({name: torch.sigmoid(out.detach().to(wide(out.dtype)))})

    hooks = [encoding.register_forward_hook(on_encoding), module.attention.register_forward_hook(sigmoid_of("gamma"))]
    if module.se_classifier is not None:
        hooks.append(module.se_classifier.register_forward_hook(sigmoid_of("presence")))
    modes = [(m, m.training) for m in model_inner.modules()]  # restored one by one: e.g. frozen BNs stay so
    try:
        model_inner.eval()  # BN running statistics, no dropout: the model as it predicts
        with torch.no_grad():
            logits = model_inner(images)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    logits = (logits["seg"] if isinstance(logits, dict) else logits).detach()
    logits = logits.to(wide(logits.dtype)).cpu()
    presence = seen.get("presence")
    return ModuleView(logits=logits, prediction=logits.argmax(1), assignments=seen["assignments"].cpu(),
                      presence=None if presence is None else presence.cpu(), gamma=seen["gamma"].cpu(),
                      residual=bool(module.residual))


def one_image(view, i):
    """The view of the i-th image of a batched ModuleView."""
    return view._replace(**{name: getattr(view, name)[i] for name in ModuleView._fields
                            if isinstance(getattr(view, name), torch.Tensor)})


def _single(view):
    """Accept a batch of one as the view of one image."""
    return one_image(view, 0) if view.assignments.dim() == 4 else view


# ----------------------------------------------------------------------------- drawing

FONT = ImageFont.load_default()
PAD, TITLE_H, ROW_H = 6, 14, 12  # pixels: margins, a title line, one bar row
MIN_LEFT, RIGHT_W = 250, 310     # the image column is at least this wide (titles); the chart column's width
DIM = 0.2                        # brightness of an undecided position (a_ik = 1/K); a certain one (a_ik = 1) is 1
INK, FAINT, BAR = (0, 0, 0), (215, 215, 215), (70, 110, 180)


def codeword_colours(num_codes):
    """A fixed, distinct, fully bright colour per codeword: golden-angle hues, alternating saturation."""
    return np.array([ImageColor.getrgb(f"hsv({k * 137.508 % 360:.1f},{(95, 55)[k % 2]}%,100%)")
                     for k in range(num_codes)], np.float64)


def assignment_brightness(weight, num_codes):
    """The strongest weight max_k a_ik ∈ [1/K, 1] → brightness ∈ [DIM, 1] (uniform → dim, certain → full)."""
    if num_codes == 1:  # one codeword: every position is certain
        return np.ones_like(weight)
    return DIM + (1 - DIM) * np.clip((weight - 1 / num_codes) / (1 - 1 / num_codes), 0, 1)


def assignment_colours(assignments):
    """K×h×w a_ik → h×w×3 uint8: each position in its strongest codeword's colour, scaled by that weight."""
    a = assignments.double().numpy()
    finite = np.isfinite(a).all(0)  # NaN where the model's forward overflowed: drawn black
    a = np.where(finite, a, 0.0)
    strongest, weight = a.argmax(0), a.max(0)
    rgb = codeword_colours(a.shape[0])[strongest] * (assignment_brightness(weight, a.shape[0]) * finite)[..., None]
    return np.rint(rgb).astype(np.uint8)


def _hwc(image):
    """H×W×3 or 3×H×W uint8 (numpy or torch) → H×W×3 numpy uint8."""
    image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return image.transpose(1, 2, 0) if image.shape[0] == 3 and image.shape[-1] != 3 else image


def _fit(text, width):
    """Shorten `text` with '...' so that it fits `width` pixels in FONT."""
    if FONT.getlength(text) <= width:
        return text
    while text and FONT.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _bar_row(draw, x, y, name, value, name_w, bar_w, colour=BAR, swatch=None, marked=None):
    """[swatch] [•] name [bar ∝ value ∈ [0, 1] in a light frame] value."""
    if swatch is not None:
        draw.rectangle([x, y + 1, x + 9, y + 10], fill=tuple(int(c) for c in swatch), outline=INK)
        x += 13
    if marked is not None:  # filled dot: in the label (or prediction); hollow: not
        draw.ellipse([x, y + 3, x + 6, y + 9], fill=INK if marked else None, outline=INK)
        x += 10
    draw.text((x, y), _fit(name, name_w - 2), fill=INK, font=FONT)
    x += name_w
    draw.rectangle([x, y + 2, x + bar_w, y + 9], outline=FAINT)
    if np.isfinite(value):  # NaN where the model's forward overflowed: no bar, the value says "nan"
        draw.rectangle([x, y + 2, x + round(bar_w * float(np.clip(value, 0, 1))), y + 9], fill=colour)
    draw.line([x + bar_w // 2, y + 1, x + bar_w // 2, y + 10], fill=(150, 150, 150))  # the 0.5 mark
    draw.text((x + bar_w + 4, y), f"{value:.2f}", fill=INK, font=FONT)


def _draw_presence(draw, x, y, presence, classes, palette, marked, source, max_rows=20):
    """(c) The SE head's class-presence probabilities, one bar per class. Returns the next free y."""
    if presence is None:
        draw.text((x, y), "no SE classifier (se_loss=False): no presence", fill=INK, font=FONT)
        return y + TITLE_H
    p = presence.double().numpy()
    rows = list(range(len(p)))
    if len(rows) > max_rows:  # many classes (ADE20K: 150): the present ones and the most probable others
        rows = sorted(rows, key=lambda c: (c not in marked, -p[c]))[:max(max_rows, len(marked))]
        rows.sort(key=lambda c: -p[c])
    title = "class presence sigmoid(se_logits)" + (f", top {len(rows)} of {len(p)}" if len(rows) < len(p) else "")
    draw.text((x, y), _fit(title, RIGHT_W), fill=INK, font=FONT)
    draw.text((x, y + TITLE_H), f"dot: in the {source}; tick: 0.5", fill=(90, 90, 90), font=FONT)
    y += 2 * TITLE_H
    for c in rows:
        _bar_row(draw, x, y, classes[c] if c < len(classes) else f"class {c}", p[c], 95, 150,
                 swatch=None if palette is None else palette[c] if c < len(palette) else (255, 255, 255),
                 marked=c in marked)
        y += ROW_H
    return y


def _draw_gamma(draw, x, y, gamma, residual, count=8):
    """(d) The featuremap attention γ: its largest and smallest channel weights, and the mean."""
    g = gamma.double().numpy()
    n = min(count, len(g) // 2)
    order = np.argsort(-g, kind="stable")
    gate = "relu(x + x * gamma)" if residual else "x * gamma"  # ASCII: the default font has no Greek
    draw.text((x, y), _fit(f"channel attention gamma, y = {gate}", RIGHT_W), fill=INK, font=FONT)
    draw.text((x, y + TITLE_H), f"C = {len(g)}, mean {g.mean():.3f}, min {g.min():.3f}, max {g.max():.3f}",
              fill=(90, 90, 90), font=FONT)
    y += 2 * TITLE_H
    for heading, channels, colour in (("largest", order[:n], (200, 90, 40)), ("smallest", order[::-1][:n],
                                                                              (60, 140, 200))):
        draw.text((x, y), heading, fill=(90, 90, 90), font=FONT)
        y += ROW_H
        for ch in channels:
            _bar_row(draw, x, y, f"ch {ch}", g[ch], 50, 200, colour=colour)
            y += ROW_H
    return y


def _draw_assignment(canvas, draw, x, y, assignments, size):
    """(b) Soft assignment: the map, upsampled (nearest) to the image, then the share of the image each
    codeword takes (mean of a_ik over positions) as one bar of colour segments. Returns (box, next y)."""
    K = assignments.shape[0]
    draw.text((x, y), f"soft assignment a_ik, K = {K} codewords", fill=INK, font=FONT)
    y += TITLE_H
    canvas.paste(Image.fromarray(assignment_colours(assignments)).resize(size, Image.NEAREST), (x, y))
    box = (x, y, x + size[0], y + size[1])
    y += size[1] + 3
    share = np.nan_to_num(assignments.double().flatten(1).mean(1).numpy(), nan=0.0)  # Σ_k = 1 where finite
    edges = np.rint(np.concatenate([[0], np.cumsum(share)]) * size[0]).astype(int)
    colours = codeword_colours(K).astype(int)
    for k in range(K):
        if edges[k + 1] > edges[k]:
            draw.rectangle([x + edges[k], y, x + edges[k + 1] - 1, y + 9], fill=tuple(colours[k]))
    y += 12
    top = np.argsort(-share, kind="stable")[:6]
    width = max(size[0], MIN_LEFT)
    draw.text((x, y), _fit("share: " + "  ".join(f"#{k} {share[k]:.0%}" for k in top), width), fill=INK, font=FONT)
    draw.text((x, y + TITLE_H), _fit("colour: strongest codeword; dim: a_ik = 1/K, bright: 1", width),
              fill=(90, 90, 90), font=FONT)
    return box, y + 2 * TITLE_H


def draw_explanation(image_uint8, view_for_one_image, classes, palette, label=None):
    """One picture of what the Context Encoding Module saw in one image (plain Pillow).

    Left column, each panel at the image's size: (a) the input and the prediction in palette colours,
    (b) the soft assignment map with each codeword's share of the image. Right column: (c) the SE head's
    class-presence probabilities, the classes of `label` (H×W, −1 ignored) marked, else the predicted
    classes, (d) the largest and smallest channel weights of γ. The panels' boxes are in picture.info['panels'].
    """
    view = _single(view_for_one_image)
    image = _hwc(image_uint8)
    H, W = image.shape[:2]
    left_w = max(W, MIN_LEFT)
    # Draw on a canvas tall enough for any column, crop at the end: no layout arithmetic to keep in sync.
    num_rows = 60 if view.presence is None else len(view.presence) + 30
    canvas = Image.new("RGB", (PAD + left_w + PAD + RIGHT_W + PAD, 3 * (H + 3 * TITLE_H) + num_rows * ROW_H),
                       "white")
    draw = ImageDraw.Draw(canvas)
    panels = {}

    # (a) input and prediction: what the module's decisions are about and what came out
    y = PAD
    pal = np.array(palette, np.uint8)
    for name, pixels in (("input", image), ("prediction", pal[view.prediction.numpy().clip(0, len(pal) - 1)])):
        draw.text((PAD, y), name, fill=INK, font=FONT)
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (PAD, y + TITLE_H))
        panels[name] = (PAD, y + TITLE_H, PAD + W, y + TITLE_H + H)
        y += TITLE_H + H + 4
    # (b) which codeword each position is assigned to, and how firmly
    panels["assignment"], y_left = _draw_assignment(canvas, draw, PAD, y, view.assignments, (W, H))

    # (c) class presence: the SE head's "which classes are in this scene", against the truth where known
    x, y = PAD + left_w + PAD, PAD
    source = "label" if label is not None else "prediction"
    present = np.asarray(label if label is not None else view.prediction)
    marked = {int(c) for c in np.unique(present) if 0 <= c < len(classes)}
    y = _draw_presence(draw, x, y, view.presence, classes, palette, marked, source) + 8
    # (d) channel attention: which featuremaps the encoded context turns up or down
    y_right = _draw_gamma(draw, x, y, view.gamma, view.residual)

    canvas = canvas.crop((0, 0, canvas.width, max(y_left, y_right) + PAD))
    canvas.info["panels"] = panels
    return canvas


# ----------------------------------------------------------------------------- conveniences

def explain_images(model, images_uint8_list, classes, palette, labels=None, mean=MEAN, std=STD):
    """Pictures (PIL) for a list of uint8 RGB images (H×W×3 or 3×H×W), one forward each (sizes may differ).
    Images are normalised with `mean`/`std` (ImageNet's, as data.normalize) on the model's device."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pictures = []
    for i, image in enumerate(images_uint8_list):
        hwc = _hwc(image)
        x = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None].to(device, dtype) / 255
        x = (x - torch.tensor(mean, device=device, dtype=dtype)[:, None, None]) / torch.tensor(
            std, device=device, dtype=dtype)[:, None, None]
        view = module_view(model, x)
        pictures.append(draw_explanation(hwc, view, classes, palette, None if labels is None else labels[i]))
    return pictures


def _as_tensor(picture):
    """PIL RGB → 3×H×W float32 in [0, 1] (TensorBoard's add_image default, dataformats='CHW')."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), np.float32) / 255).permute(2, 0, 1).contiguous()


def tensorboard_views(view, classes=None, label=None, index=0):
    """{'assignment': 3×H×W, 'presence': 3×h×w} float images in [0, 1] of one image of a view, for
    writer.add_image(f'val/{name}/{i}', t, step). 'presence' is absent without an SE classifier.

    The assignment map is at the image's resolution (nearest upsampling, as in draw_explanation)."""
    view = one_image(view, index) if view.assignments.dim() == 4 else view
    H, W = view.prediction.shape
    out = {"assignment": _as_tensor(Image.fromarray(assignment_colours(view.assignments)).resize((W, H),
                                                                                              Image.NEAREST))}
    if view.presence is not None:
        n = len(view.presence)
        names = classes if classes is not None else [f"class {c}" for c in range(n)]
        present = np.asarray(label if label is not None else view.prediction)
        marked = {int(c) for c in np.unique(present) if 0 <= c < n}
        canvas = Image.new("RGB", (RIGHT_W + 2 * PAD, (n + 3) * ROW_H + 2 * TITLE_H), "white")
        y = _draw_presence(ImageDraw.Draw(canvas), PAD, PAD, view.presence, names, None, marked,
                           "label" if label is not None else "prediction")
        out["presence"] = _as_tensor(canvas.crop((0, 0, canvas.width, y + PAD)))
    return out


def at_long_side(images, long_side):
    """Normalised B×3×H×W images with the long side resized to `long_side` (bilinear, align_corners=False;
    the sizes of protocols.repo_views at scale 1): the scale the model's data was seen at, whatever a photo's
    size. Returned as they are when already so (the built-in data: 64×320 at base size 320)."""
    h, w = images.shape[-2:]
    size = (long_side, int(w * long_side / h + 0.5)) if h >= w else (int(h * long_side / w + 0.5), long_side)
    return images if size == (h, w) else F.interpolate(images, size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- the README's figure

def save_explained_samples(model, path, gap=10):
    """The README's figure: what `model`, trained on the built-in context data (train_seg.py --data context),
    saw in the first validation panorama of each of the four scenes (those of context_data.save_context_samples),
    each drawn by draw_explanation with its true labels marked, under a line naming the scene, stacked top to
    bottom `gap` pixels apart. Saved to `path` (its folder made); → the figure (PIL), whose
    info['pictures'] holds each picture's scene, validation index, top-left corner and panel boxes (in the
    figure's pixels). A model without a Context Encoding Module: context_module's one-line ValueError."""
    context_module(model)  # before generating anything
    images, labels = context_data.context_split("val")
    scenes = labels.flatten(1).max(1).values - 3  # a panorama's largest label is its things': 3 + scene
    picks = [int((scenes == s).nonzero()[0, 0]) for s in range(len(context_data.CONTEXT_SCENES))]
    pictures = explain_images(model, [images[i] for i in picks], context_data.CONTEXT_CLASSES,
                              context_data.CONTEXT_PALETTE, [labels[i].numpy() for i in picks])
    title_h = PAD + TITLE_H
    width = max(p.width for p in pictures)
    figure = Image.new("RGB", (width, sum(title_h + p.height for p in pictures) + gap * (len(pictures) - 1)),
                       "white")
    draw = ImageDraw.Draw(figure)
    y, placed = 0, []
    for s, (i, picture) in enumerate(zip(picks, pictures)):
        if s:
            draw.line([(0, y + gap // 2), (width, y + gap // 2)], fill=FAINT)
            y += gap
        scene, _, thing = context_data.CONTEXT_SCENES[s][:3]
        draw.text((PAD, y + PAD), _fit(f"{scene} (validation panorama {i}): the white things are '{thing}'; "
                                       f"dots mark the true labels' classes", width - 2 * PAD), fill=INK, font=FONT)
        figure.paste(picture, (0, y + title_h))
        panels = {name: (x0, y0 + y + title_h, x1, y1 + y + title_h)
                  for name, (x0, y0, x1, y1) in picture.info["panels"].items()}
        placed.append({"scene": scene, "index": i, "corner": (0, y + title_h), "panels": panels})
        y += title_h + picture.height
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.save(path)
    figure.info["pictures"] = placed
    return figure
