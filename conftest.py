"""Test helpers and fixtures shared by test_all.py: tiny models, dataset fixtures in the real layouts, references."""
import torch


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
