"""eval.py: the evaluation protocols against direct computations, and the command line (to merge into test_all.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import encnet
import eval as seg_eval  # noqa: E402  (`eval` shadows the builtin)
from test_all import make_ade, tiny

PAD_VALUE = torch.tensor([-m / s for m, s in zip(data.MEAN, data.STD)]).view(1, 3, 1, 1)


class Recorder(torch.nn.Module):
    """A model that remembers every batch it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.model(x)


def tiny_encnet(num_classes=5):
    torch.manual_seed(0)
    return tiny(encnet.EncNet, num_classes).eval()


def test_released_sizes_windows_and_padding_follow_the_source_arithmetic():
    # long side ceil(base·scale), short side int(x + 0.5), a square counts as wide (MultiEvalModule.forward)
    assert [seg_eval.released_size(50, 70, 40, s) for s in seg_eval.MULTI_SCALES] == \
        [(14, 20), (21, 30), (29, 40), (36, 50), (43, 60), (50, 70)]
    assert seg_eval.released_size(70, 50, 40, 1.75) == (70, 50)
    assert seg_eval.released_size(375, 500, 520, 1.25) == (488, 650)  # 375·650/500 = 487.5 rounds up
    assert seg_eval.released_size(33, 33, 10, 0.75) == (8, 8)  # ceil(7.5)
    # the grid starts at 0 with stride int(2/3 crop); the last windows are clipped (then padded)
    assert seg_eval.released_windows(60, 100, 48) == [(0, 48, 0, 48), (0, 48, 32, 80), (0, 48, 64, 100),
                                                      (32, 60, 0, 48), (32, 60, 32, 80), (32, 60, 64, 100)]
    assert seg_eval.released_windows(480, 480, 480) == [(0, 480, 0, 480)]
    # padding: the value a black pixel normalises to, bottom and right only
    image = torch.randn(1, 3, 5, 7)
    padded = seg_eval.released_pad(image, 9)
    black = data.normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    assert padded.shape == (1, 3, 9, 9) and torch.equal(padded[:, :, :5, :7], image)
    torch.testing.assert_close(padded[:, :, 5:, :], black.expand(1, 3, 4, 9))
    torch.testing.assert_close(padded[:, :, :, 7:], black.expand(1, 3, 9, 2))


def released_reference(model, image, crop, base, scales):
    """MultiEvalModule.forward written out window by window, one sample per forward."""
    _, _, h, w = image.shape
    stride = int(crop * 2 / 3)

    def pad(x):
        out = PAD_VALUE.expand(1, 3, max(x.shape[2], crop), max(x.shape[3], crop)).clone()
        out[:, :, :x.shape[2], :x.shape[3]] = x
        return out

    def module_inference(x):
        return (model(x) + model(x.flip(3)).flip(3)).exp()

    scores = 0
    for scale in scales:
        long_side = math.ceil(base * scale)
        height, width = (long_side, int(w * long_side / h + 0.5)) if h > w else (int(h * long_side / w + 0.5),
                                                                                  long_side)
        resized = F.interpolate(image, (height, width), mode="bilinear", align_corners=True)
        if long_side <= crop:
            outputs = module_inference(pad(resized))[:, :, :height, :width]
        else:
            padded = pad(resized) if min(height, width) < crop else resized
            ph, pw = padded.shape[2:]
            outputs, count = torch.zeros(1, 5, ph, pw), torch.zeros(1, 1, ph, pw)
            for i in range(math.ceil((ph - crop) / stride) + 1):
                for j in range(math.ceil((pw - crop) / stride) + 1):
                    y0, x0 = i * stride, j * stride
                    y1, x1 = min(y0 + crop, ph), min(x0 + crop, pw)
                    out = module_inference(pad(padded[:, :, y0:y1, x0:x1]))
                    outputs[:, :, y0:y1, x0:x1] += out[:, :, :y1 - y0, :x1 - x0]
                    count[:, :, y0:y1, x0:x1] += 1
            outputs = (outputs / count)[:, :, :height, :width]
        scores = scores + F.interpolate(outputs, (h, w), mode="bilinear", align_corners=True)
    return scores


def test_released_protocol_matches_a_window_by_window_computation():
    model = tiny_encnet()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        expected = released_reference(model, image, 32, 40, seg_eval.MULTI_SCALES)
    got = seg_eval.predict_released(model, image, 32, 40, window_batch=8)  # windows and mirror images batched
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # batching is exact up to float rounding: one window per forward gives the same scores
    one_by_one = seg_eval.predict_released(model, image, 32, 40, window_batch=1)
    assert ((got - one_by_one).abs() / one_by_one.abs()).max() < 1e-5

    # an image within the crop is padded to one window too, and its mirror image goes in after it
    recorder = Recorder(model)
    seg_eval.predict_released(recorder, image, 32, 40, scales=(0.5,))
    mirrored, window = recorder.inputs
    assert window.shape == (1, 3, 32, 32) and torch.equal(mirrored, window.flip(-1))
    torch.testing.assert_close(window[0, :, 14:, :], PAD_VALUE[0].expand(3, 18, 32))  # resized to 14×20
    torch.testing.assert_close(window[0, :, :, 20:], PAD_VALUE[0].expand(3, 32, 12))
    # on a GPU (here: asked for) the windows of a scale go in as one batch
    recorder = Recorder(model)
    seg_eval.predict_released(recorder, image, 32, 40, scales=(1.75,), window_batch=8)
    assert [len(x) for x in recorder.inputs] == [6, 6]  # 2×3 windows (50×70), then their mirror images
    # Cityscapes has its own scales (test.py)
    assert seg_eval.make_predictor("released", 32, 40, "cityscapes").keywords["scales"] == \
        (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25)


def test_mmseg_sizes_follow_mmcv_rescale_size():
    # ADE20K's box (2048, 512): a typical 683×512 image is left as is, a small one scaled ×2
    assert seg_eval.mmseg_size(512, 683, (2048, 512)) == (512, 683)
    assert seg_eval.mmseg_size(256, 341, (2048, 512)) == (512, 682)
    assert seg_eval.mmseg_size(700, 300, (2048, 512)) == (1195, 512)  # the short side fills the box
    assert seg_eval.mmseg_size(1024, 2048, (2048, 1024)) == (1024, 2048)  # Cityscapes: full resolution
    assert seg_eval.mmseg_size(1024, 2048, (1024, 512)) == (512, 1024)  # img_ratio 0.5
    assert seg_eval.MMSEG_TEST_BOX["ade20k"] == (2048, 512) and seg_eval.MMSEG_TEST_BOX["cityscapes"] == (2048, 1024)


def mmseg_reference(model, pixels, box, ratios, flip):
    """mmsegmentation's test: uint8 image resized into box·ratio (keep ratio), whole-image forward, logits
    resized to the original size, softmax, flipped back, averaged over the views."""
    h, w = pixels.shape[2:]
    total, views = 0, 0
    for ratio in ratios:
        long_side, short_side = int(box[0] * ratio), int(box[1] * ratio)
        factor = min(long_side / max(h, w), short_side / min(h, w))
        size = (int(h * factor + 0.5), int(w * factor + 0.5))
        resized = pixels.float() if size == (h, w) else \
            F.interpolate(pixels.float(), size, mode="bilinear", align_corners=False).round()
        for mirrored in (False, True) if flip else (False,):
            x = data.normalize(resized.flip(3) if mirrored else resized.clone())  # normalize works in place
            probs = F.interpolate(model(x), (h, w), mode="bilinear", align_corners=False).softmax(1)
            total, views = total + (probs.flip(3) if mirrored else probs), views + 1
    return total / views


def test_mmseg_protocols_match_a_view_by_view_computation():
    model = tiny_encnet()
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 24, 40), np.uint8))
    image = data.normalize(pixels)
    for ratios, flip in (((1.0,), False), (seg_eval.MULTI_SCALES, True)):
        recorder = Recorder(model)
        got = seg_eval.predict_mmseg(recorder, image, (64, 32), ratios, flip)
        with torch.no_grad():
            expected = mmseg_reference(model, pixels, (64, 32), ratios, flip)
        # (rounding to pixel levels could land one level apart where a value is a hair from x.5)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert (got.argmax(1) == expected.argmax(1)).double().mean() > 0.99
        # the whole resized image is one forward (its mirror image another)
        sizes = [(32, 53)] if not flip else [(16, 27), (24, 40), (32, 53), (40, 67), (48, 80), (56, 93)]
        assert [tuple(x.shape) for x in recorder.inputs] == [(1, 3, *size) for size in sizes for _ in range(1 + flip)]
        assert not flip or torch.equal(recorder.inputs[1], recorder.inputs[0].flip(-1))
    torch.testing.assert_close(got.sum(1), torch.ones(1, 24, 40))


def test_repo_protocol_is_todays_path_with_windows_batched():
    import bench
    model = tiny_encnet()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 50, 70)
    # windows of 32 at stride 21, the last ones shifted back to the border
    assert seg_eval.repo_windows(50, 70, 32) == [(0, 0), (0, 21), (0, 38), (18, 0), (18, 21), (18, 38)]
    for scales, flip in (((1.0,), False), (seg_eval.MULTI_SCALES, True)):
        expected = bench.todays_eval_predict(model, image, 32, 48, scales, flip)  # one window per forward
        for window_batch in (1, 3, 8):
            got = seg_eval.predict(model, image, 32, 48, scales, flip, window_batch=window_batch)
            assert (got - expected).abs().max() < 1e-6


def test_bf16_autocast_stays_close_to_float32():
    model = tiny_encnet()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 50, 70)
    fp32 = seg_eval.predict(model, image, 32, 48)
    bf16 = seg_eval.predict(model, image, 32, 48, amp=True)
    # measured: probabilities within 6e-4, every pixel keeps its class
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 1e-2
    assert (bf16.argmax(1) == fp32.argmax(1)).double().mean() >= 0.99


def test_metric_conventions_of_the_protocols(capsys, tmp_path):
    metric = seg_eval.SegMetric(4)
    metric.update(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 2, -1]))  # class 3 nowhere
    iou = [1.0, 0.5, 0.0]  # class 2: in the labels, never predicted right
    assert metric.pixacc_miou() == pytest.approx((0.75, sum(iou) / 3))  # mmseg: nanmean
    assert metric.pixacc_miou(absent_as_zero=True) == pytest.approx((0.75, sum(iou) / 4))  # released: / all
    seg_eval.report(metric, ["a", "b", "c", "d"], "pcontext", "val", "released", tmp_path)
    out = capsys.readouterr().out
    assert f"{100 * sum(iou) / 4 * 59 / 60:.2f}" in out and "pcontext val multi-scale (released protocol)" in out
    assert (tmp_path / "per_class_iou_pcontext_val_released.txt").read_text().splitlines()[-1].endswith("37.50")


# ----------------------------------------------------------------------------- command line (in process)

def fake_zoo(monkeypatch, dataset="ade20k", num_classes=150, crop=32, base=40, data_root=None):
    """encnet.load_model replaced by a tiny EncNet with `info` as the contract describes it."""
    info = dict(format="train_seg", dataset=dataset, crop_size=crop, base_size=base, data_root=data_root,
                classes=[f"class{i}" for i in range(num_classes)],
                palette=[[i % 256, (7 * i) % 256, (13 * i) % 256] for i in range(num_classes)])
    loaded = []

    def load_model(source):
        if source == "broken":
            raise encnet.DownloadError("https://example/x.pth: download failed (no network)")
        if source == "missing.pth":
            raise FileNotFoundError("missing.pth: no such file, and not a zoo name")
        loaded.append(source)
        return tiny_encnet(num_classes), dict(info)

    monkeypatch.setattr(encnet, "load_model", load_model, raising=False)
    return loaded


def main_exit(argv):
    with pytest.raises(SystemExit) as e:
        seg_eval.main([str(a) for a in argv])
    return e.value.code


def test_cli_protocols_write_separate_tables_with_progress(tmp_path, monkeypatch, capsys):
    make_ade(tmp_path / "data", n=2)
    fake_zoo(monkeypatch, data_root=str(tmp_path / "data"))
    monkeypatch.setitem(seg_eval.MMSEG_TEST_BOX, "ade20k", (64, 32))  # tiny box for a tiny model
    runs = {"repo": [], "repo-ms": ["--multi-scale"], "released": ["--protocol", "released"],
            "mmseg": ["--protocol", "mmseg"], "mmseg-ms": ["--protocol", "mmseg-ms"]}
    for protocol, flags in runs.items():
        seg_eval.main(["--checkpoint", "zoo", "--out", str(tmp_path / "eval"), "--log-every", "1e-9", *flags])
        out = capsys.readouterr().out
        assert (tmp_path / "eval" / f"per_class_iou_ade20k_val_{protocol}.txt").exists()
        assert "eval 1/2 images |" in out and "img/s | eta" in out and "eval 2/2 images" in out
        title = {"repo": "ade20k val:", "repo-ms": "ade20k val multi-scale:"}.get(
            protocol, f"ade20k val{' multi-scale' if protocol != 'mmseg' else ''} ({protocol} protocol):")
        assert f"{title} pixAcc" in out, out
    assert len(list((tmp_path / "eval").iterdir())) == 5


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    fake_zoo(monkeypatch, dataset="context", num_classes=6, crop=320, base=320)
    for argv, message in ((["--checkpoint", "zoo", "--multi-scale"], "multi-scale does not apply to the built-in "
                                                                         "context data"),
                          (["--checkpoint", "zoo", "--protocol", "released"], "never learnt"),
                          (["--checkpoint", "zoo", "--protocol", "mmseg"], "no EncNet test setting for 'context'"),
                          (["--checkpoint", "broken"], "download failed"),
                          (["--checkpoint", "missing.pth"], "not a zoo name"),
                          (["--checkpoint", "zoo", "--images", tmp_path / "nothing"], "no such file or folder")):
        assert main_exit([*argv, "--out", tmp_path]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def write_photo(path, w, h, orientation=None, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation  # EXIF Orientation
    image.save(path, exif=exif.tobytes())


def test_images_exif_empty_folders_and_unreadable_files(tmp_path, monkeypatch, capsys):
    fake_zoo(monkeypatch)
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "a.jpg", 40, 24, orientation=6)  # stored 40×24, shown rotated: 24×40
    write_photo(photos / "c.png", 30, 20)
    (photos / "b.jpg").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("skipped: not an image name")
    assert main_exit(["--checkpoint", "zoo", "--images", photos, "--out", tmp_path / "pred"]) != 0
    err = capsys.readouterr().err.strip()
    assert "1 of 3 images could not be read" in err and "b.jpg" in err and len(err.splitlines()) == 1
    assert Image.open(tmp_path / "pred" / "a.png").size == (24, 40)  # upright
    assert Image.open(tmp_path / "pred" / "a_overlay.jpg").size == (24, 40)
    assert Image.open(tmp_path / "pred" / "c.png").size == (30, 20)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert main_exit(["--checkpoint", "zoo", "--images", empty]) != 0
    assert "holds no images" in capsys.readouterr().err


def test_label_pngs_in_each_datasets_encoding():
    pred = torch.tensor([[0, 1, 18], [2, 10, 0]])
    ids = np.asarray(seg_eval.label_png(pred, "cityscapes"))
    assert ids.tolist() == [[7, 8, 33], [11, 23, 7]]  # Cityscapes' official label ids, not train ids
    assert np.asarray(seg_eval.label_png(pred, "ade20k")).tolist() == [[1, 2, 19], [3, 11, 1]]  # class + 1
    voc = seg_eval.label_png(pred, "pascal_voc")
    assert voc.mode == "P" and np.asarray(voc).tolist() == pred.tolist()
