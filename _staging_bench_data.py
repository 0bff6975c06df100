import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import data


def bench_augmentation(num_images=8, quick=False):
    """Items/s of data.py's one-warp training augmentation vs the released sequential Pillow pipeline.

    Both produce whole training items (JPEG and PNG decode, label check, augmentation, tensors) from the
    same synthetic ADE20K-sized files (683×512, JPEG quality 90) with the same random parameters, on one
    core, crop 480 / base 520. The sequential pipeline is flip → resize → rotate → pad → crop, as released.
    """
    crop_size, base_size, epochs = 480, 520, 1 if quick else 4
    num_images = min(num_images, 4) if quick else num_images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    noise = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        image_dir = Path(root, 'ADEChallengeData2016', 'images', 'training')
        label_dir = Path(root, 'ADEChallengeData2016', 'annotations', 'training')
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for i in range(num_images):  # smooth colour fields with some grain, blocky label regions
            smooth = Image.fromarray(noise.integers(0, 256, (12, 16, 3), np.uint8)).resize((683, 512), Image.BICUBIC)
            grain = noise.normal(0, 6, (512, 683, 3))
            image = np.clip(np.asarray(smooth) + grain, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(image_dir / f'{i:04d}.jpg', quality=90)
            label = Image.fromarray(noise.integers(0, 151, (8, 11), np.uint8)).resize((683, 512), Image.NEAREST)
            label.save(label_dir / f'{i:04d}.png')
        dataset = data.get_dataset('ade20k', root, 'train', crop_size, base_size)

        def sequential_item(index):
            image_path, label_path = dataset.samples[index]
            image = Image.open(image_path).convert('RGB')
            raw = data.read_png_label(label_path)
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
            return data.image_tensor(image.crop(box)), torch.from_numpy(dataset.lut[np.asarray(label.crop(box))])

        seconds = {'warp': 0.0, 'sequential': 0.0}
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            for index in range(num_images):  # alternate, so background load hits both alike
                for name, item in (('warp', dataset.__getitem__), ('sequential', sequential_item)):
                    start = time.perf_counter()
                    item(index)
                    seconds[name] += time.perf_counter() - start
    torch.set_num_threads(threads)
    items = epochs * num_images
    return {'warp_items_per_s': items / seconds['warp'], 'sequential_items_per_s': items / seconds['sequential'],
            'speedup': seconds['sequential'] / seconds['warp']}
