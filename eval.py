"""Evaluate a segmentation model, or segment your own images with it.

    python eval.py --checkpoint runs/seg/checkpoint.pth                       # built-in data
    python eval.py --checkpoint CKPT --data ade20k --data-root DATA --multi-scale
    python eval.py --checkpoint encnet_resnet50s_ade --data-root DATA --protocol released
    python eval.py --checkpoint CKPT --images photo.jpg folder/ --out predictions/
    python eval.py --checkpoint CKPT --images photo.jpg --explain              # + what the Encoding layer saw
    python eval.py --checkpoint runs/seg/checkpoint.pth --explain-figure docs/explained.png   # README figure
    python eval.py --checkpoint CKPT --export encnet.onnx                     # or encnet.pt2 (torch.export)

--checkpoint: anything zoo.load_model reads (a train_seg.py checkpoint, a file of the authors' or of
mmsegmentation's EncNet zoo, or a zoo name); classes, palette, crop and base size come with it.

The metric (pixAcc, mIoU) is metric.py's; the protocols (--protocol repo, released, mmseg, mmseg-ms) are
protocols.py's, where each is described; by default the model's own (protocols.default_protocol: a train_seg.py
checkpoint's recipe's). One line says which protocol, why, and whether bf16 (--amp) or float32 computes.

--images: one colour PNG per image plus an overlay (or with --label-png, label-index PNGs in the dataset's
encoding: ADE20K/PASCAL-Context class+1, VOC class index, Cityscapes official label ids; your own data
(--data folder) the class index). Each class map is protocols.segment's, the call from Python. Photos are
turned upright by their EXIF orientation first (dataset images are not: their labels follow the stored
pixels); 16-bit images are scaled to 8 bits. Outputs never replace an input or an existing file (--overwrite
allows the latter), and two inputs may not share an output name; unreadable files are named at the end,
after the others are written, and the exit status is 1.
"""

import argparse
import json
import os
import time
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageOps

import data
import errors
import explain
import export
import protocols
import recipes
import zoo
# eval.SegMetric and eval.predict_released are the public contract (interface.md): imported here under those names
from metric import SegMetric, evaluate, per_class_table  # noqa: F401
from protocols import PROTOCOLS, class_map, make_predictor, predict_released  # noqa: F401
from run import (HelpFormatter, check_writable, cpu_has_fast_bf16, end_distributed, fail, run_or_exit,
                 setup_distributed, warn)
from transforms import normalize, to_rgb


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(paths):
    """Files as given, folders expanded to the images directly in them (not their subfolders).
    → (files, what was skipped in the folders, in words: '' when nothing; broken links are named there with
    their targets)."""
    files, other_files, subfolders, broken = [], [], [], []
    for path in paths:
        if os.path.isdir(path):
            entries = sorted(os.scandir(path), key=lambda e: e.name)
            found = [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
            other_files += [e.name for e in entries if e.is_file() and not e.name.lower().endswith(IMAGE_SUFFIXES)]
            subfolders += [e.name for e in entries if e.is_dir()]
            broken += [f"{e.name} → {os.readlink(e.path)}" for e in entries
                       if e.is_symlink() and not os.path.exists(e.path)]
            if not found:
                raise errors.DataError(f"--images {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        elif os.path.islink(path):
            raise errors.DataError(f"--images {path}: a broken link (to {os.readlink(path)}, which does not exist)")
        else:
            raise errors.DataError(f"--images {path}: no such file or folder")
    skipped = []
    if other_files:
        skipped.append(f"{len(other_files)} files of other types ({', '.join(other_files[:3])}"
                       f"{', …' if len(other_files) > 3 else ''})")
    if subfolders:
        skipped.append(f"{len(subfolders)} subfolders ({', '.join(subfolders[:3])}{', …' if len(subfolders) > 3 else ''})")
    if broken:
        skipped.append(f"{len(broken)} broken link{'s' if len(broken) > 1 else ''} ({', '.join(broken[:3])}"
                       f"{', …' if len(broken) > 3 else ''})")
    return files, ", ".join(skipped[:-1]) + " and " * (len(skipped) > 1) + "".join(skipped[-1:])


def image_outputs(files, out_dir, label_pngs, overwrite=False):
    """The files --images writes for each input, checked before any work → [(input, colour or label PNG,
    overlay or None)]. Refused, naming the files: an output that is an input (or --out an input folder), two
    inputs with one output name (x.jpg and x.png, a/x.jpg and b/x.jpg), an existing file without --overwrite."""
    inputs = {os.path.realpath(f) for f in files}
    folders = {os.path.dirname(f) for f in inputs}
    if os.path.realpath(out_dir) in folders:
        raise errors.UserError(f"--out {out_dir} is a folder of the input images: the predictions would mix with "
                             f"(and could replace) them; choose another --out")
    plan, owner = [], {}
    for path in files:
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        outputs = (f"{stem}.png", None if label_pngs else f"{stem}_overlay.jpg")
        for out in filter(None, outputs):
            if out in owner:
                raise errors.UserError(f"{owner[out]} and {path} would both be written to {out}: rename one, or "
                                     f"segment them into different --out folders")
            owner[out] = path
            if os.path.realpath(out) in inputs:
                raise errors.UserError(f"{out} would replace the input image {out}; choose another --out")
        plan.append((path, *outputs))
    existing = [out for out in owner if os.path.exists(out)]
    if existing and not overwrite:
        raise errors.UserError(f"{len(existing)} output files exist already ({', '.join(existing[:3])}"
                             f"{', …' if len(existing) > 3 else ''}); nothing was written. Choose another --out, or "
                             f"--overwrite to replace them")
    return plan


def read_photo(path):
    """An RGB photo (PIL), turned upright by its EXIF orientation (cameras store the sensor's pixels and a
    tag). 16-bit images are scaled to 8 bits (Pillow's own conversion would clip them to white); images of
    32-bit integers or floats have no photo's range and are refused: transforms.to_rgb, as the datasets read
    their images."""
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except ValueError as e:
        raise errors.DataError(f"{path}: {e}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise errors.DataError(f"{path} ({e})") from None


def segment_images(model, plan, palette, device, segmenter, dataset_name, log_every=10.0):
    """One colour PNG per image (or a label-index PNG) at the input's size, plus an overlay on the photograph,
    as image_outputs planned them; a progress line per image. segmenter(photo) → its H×W class map:
    protocols.segment with the command's protocol and sizes, the function Python users call.
    → the files that could not be read, each with its reason (the others are written)."""
    palette = torch.tensor(palette, dtype=torch.uint8)
    unreadable, start = [], time.time()
    for done, (path, out, overlay) in enumerate(plan, 1):
        try:
            photo = read_photo(path)
        except errors.DataError as e:
            unreadable.append(str(e))
            continue
        if time.time() - start > log_every:
            print(f"[{done}/{len(plan)}] {path} ({photo.width}×{photo.height}) ...", flush=True)
        pred = segmenter(photo)
        intact = (f"the predictions of the {done - 1 - len(unreadable)} images before it are complete; free space "
                  f"and run the command again with --overwrite")
        with errors.writing(out, f"the prediction {out}", intact):  # a full disk: one line, no half file
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            if overlay is None:
                data.label_png(pred, dataset_name).save(out)
            else:
                colour = Image.fromarray(data.colorize(pred, palette).permute(1, 2, 0).numpy())
                colour.save(out)
        if overlay is not None:
            with errors.writing(overlay, f"the overlay {overlay}", intact):
                Image.blend(photo, colour, 0.5).save(overlay)
        rate = done / (time.time() - start)
        print(f"[{done}/{len(plan)}] {path} → {out} | eta {(len(plan) - done) / rate:.0f} s", flush=True)
    return unreadable


def explain_outputs(plan, overwrite=False):
    """--explain: one picture beside each prediction, OUT/NAME_explain.png, checked before any work as
    image_outputs checks its files → [(input, picture)]. plan: image_outputs'. Refused, naming the files: a
    picture that is an input or another input's output (x.png and x_explain.png), an existing file without
    --overwrite."""
    inputs = {os.path.realpath(entry[0]) for entry in plan}
    planned = {out: entry[0] for entry in plan for out in entry[1:] if out}
    pictures = []
    for path, out, *_ in plan:
        picture = f"{os.path.splitext(out)[0]}_explain.png"
        if picture in planned:
            raise errors.UserError(f"{planned[picture]} and {path} would both be written to {picture} (a "
                                   f"prediction and an --explain picture): rename one, or segment them into "
                                   f"different --out folders")
        if os.path.realpath(picture) in inputs:
            raise errors.UserError(f"{picture} would replace the input image {picture}; choose another --out")
        pictures.append((path, picture))
    existing = [picture for _, picture in pictures if os.path.exists(picture)]
    if existing and not overwrite:
        raise errors.UserError(f"{len(existing)} --explain pictures exist already ({', '.join(existing[:3])}"
                               f"{', …' if len(existing) > 3 else ''}); nothing was written. Choose another --out, "
                               f"or --overwrite to replace them")
    return pictures


def explainable(model, flag="--explain"):
    """--explain and --explain-figure need a Context Encoding Module with codewords: else one line saying why
    not, before any work."""
    try:
        explain.context_module(model)
    except ValueError as e:
        fail(f"{flag}: {e}")


def check_explain_figure(args):
    """--explain-figure FILE.png, checked before the model is loaded."""
    path = args.explain_figure
    if not path.lower().endswith(".png"):
        fail(f"--explain-figure {path}: name it *.png")
    if os.path.isdir(path):
        fail(f"--explain-figure {path} is a folder; name the PNG to write")
    if os.path.exists(path) and not args.overwrite:
        fail(f"--explain-figure {path} exists already; nothing was changed (--overwrite replaces it)")
    if args.images or args.export or args.data or args.data_root or args.multi_scale:
        fail("--explain-figure draws the built-in context data's panoramas; --images, --export, --data, --data-root "
             "and --multi-scale do not apply to it")


def explain_figure(model, info, checkpoint, path):
    """--explain-figure: the README's figure, explain.save_explained_samples, for a model of the built-in data."""
    if info["dataset"] != "context":
        fail(f"--explain-figure: {checkpoint} was trained on {info['dataset'] or 'other data'}; the figure "
             f"explains the built-in context data's panoramas (a model of train_seg.py --data context)")
    with errors.writing(path, f"the figure {path}", "free space and run the command again"):
        explain.save_explained_samples(model, path)
    print(f"{checkpoint} → {path} (what the Context Encoding Module saw in the first validation panorama of each "
          f"scene)")


def explain_photos(model, pictures, classes, palette, device, segmenter, base_size):
    """--explain: for each (input, picture) of explain_outputs, explain.draw_explanation at the photo's size:
    the photo; the prediction, segmenter(photo) as segment_images made it (computed again here), whose classes
    the presence chart marks (a photo has no label); the codeword assignment map, the SE head's class presence
    and the channel attention γ, read in one forward of the photo with its long side at base size (the scale
    the model saw its data at: explain.at_long_side). A file that cannot be read is skipped (segment_images
    names it)."""
    for done, (path, out) in enumerate(pictures, 1):
        try:
            photo = read_photo(path)
        except errors.DataError:
            continue
        pred = segmenter(photo)
        image = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)
        x = normalize(image[None].to(device))
        view = explain.one_image(explain.module_view(model, explain.at_long_side(x, base_size)), 0)
        picture = explain.draw_explanation(np.asarray(photo), view._replace(prediction=pred), classes, palette)
        with errors.writing(out, f"the --explain picture {out}", f"the predictions and the {done - 1} --explain "
                            f"pictures before it are complete; free space and run the command again with --overwrite"):
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            picture.save(out)
        print(f"[{done}/{len(pictures)}] {path} → {out} (explained)", flush=True)


# ----------------------------------------------------------------------------- command line

def positive(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be positive")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--checkpoint", required=True,
                   help="a train_seg.py checkpoint, a zoo file (authors' or mmsegmentation's) or a zoo name")
    p.add_argument("--data", help="dataset to evaluate on (default: the model's)")
    p.add_argument("--data-root", help="folder holding the dataset in its standard layout")
    p.add_argument("--split", default="val", help="the split to evaluate")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="test-time procedure and mIoU convention: repo (this project's), released (the authors' "
                        "multi-scale code), mmseg / mmseg-ms (mmsegmentation's); see above. Default: the model's "
                        "own (protocols.default_protocol): a train_seg.py checkpoint's final evaluation's, mmseg for "
                        "mmsegmentation's files, repo for the authors' files and otherwise")
    p.add_argument("--multi-scale", action="store_true",
                   help="repo: scales 0.5–1.75 with flips, probabilities averaged; mmseg: = mmseg-ms")
    p.add_argument("--crop-size", type=positive, help="window size (default: the model's)")
    p.add_argument("--base-size", type=positive, help="long side at scale 1 (default: the model's)")
    p.add_argument("--images", nargs="+", help="segment these image files or folders instead")
    p.add_argument("--explain", action="store_true",
                   help="with --images: also draw what the Context Encoding Module saw in each image (explain.py), "
                        "OUT/NAME_explain.png: the image, the prediction, the codeword assignments, the class "
                        "presence and the channel attention (EncNet with K > 0 codewords)")
    p.add_argument("--explain-figure", metavar="FILE.png",
                   help="write the README's figure instead of evaluating: what a model trained on the built-in "
                        "context data saw in the first validation panorama of each scene (explain.py)")
    p.add_argument("--label-png", action="store_true",
                   help="with --images: write label-index PNGs in the dataset's encoding (for test servers)")
    p.add_argument("--out", default="predictions", help="folder for --images output, the IoU table and results")
    p.add_argument("--overwrite", action="store_true", help="with --images or --export: replace existing output files")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast for speed where bf16 is native (GPUs; CPUs with AVX512-BF16 or AMX, there "
                        "with channels_last); elsewhere float32, with a warning")
    p.add_argument("--window-batch", type=positive, help="windows per forward (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--export", metavar="FILE",
                   help="write the model for deployment instead of evaluating: FILE.onnx (ONNX, needs onnx and "
                        "onnxscript) or FILE.pt2 (torch.export); dynamic batch, height and width; classes, palette "
                        "and the input's normalisation in its metadata")
    p.add_argument("--log-every", type=float, default=10.0,
                   help="seconds between progress lines (of rank 0's share of the images)")
    args = p.parse_args(argv)
    args.protocol = {"repo": "repo-ms", "mmseg": "mmseg-ms"}.get(args.protocol, args.protocol) \
        if args.multi_scale else args.protocol
    if args.explain and not args.images:
        fail("--explain applies to --images (it draws what the Context Encoding Module saw in each of them)")
    if args.label_png and not args.images:
        fail("--label-png applies to --images (it writes their predictions as label-index PNGs)")
    if args.overwrite and not (args.images or args.export or args.explain_figure):
        fail("--overwrite applies to --images, --export and --explain-figure (evaluation only replaces its own "
             "per_class_iou and results files)")
    if args.explain_figure:
        check_explain_figure(args)
    if args.images and (args.data_root or args.split != "val"):
        fail("--data-root and --split choose a dataset split to evaluate; --images segments the files given instead")
    if args.export:
        if not args.export.endswith((".onnx", ".pt2")):
            fail(f"--export {args.export}: name it *.onnx (ONNX) or *.pt2 (torch.export)")
        if os.path.exists(args.export) and not args.overwrite:
            fail(f"--export {args.export} exists already; nothing was changed (--overwrite replaces it)")
        if args.images or args.data or args.data_root or args.multi_scale:
            fail("--export writes the model only; --images, --data, --data-root and --multi-scale evaluate it")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file; it must be a folder (made if missing)")
    # what the command writes, probed before any work (folders are made where missing, once there is output)
    if args.export:
        check_writable(os.path.dirname(args.export) or ".", f"--export {args.export}")
    elif args.explain_figure:
        check_writable(os.path.dirname(args.explain_figure) or ".", f"--explain-figure {args.explain_figure}")
    else:  # --images' pictures, or an evaluation's scores and per-class table
        check_writable(args.out, f"--out {args.out}")
    return args


def use_amp(amp, device):
    """--amp where bf16 is native; a CPU without AVX512-BF16/AMX would emulate it, many times slower: float32."""
    if amp and device.type == "cpu" and not cpu_has_fast_bf16():
        warn("--amp: this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 is emulated and many times slower; "
             "evaluating in float32")
        return False
    return amp


def default_protocol_reason(info, dataset):
    """Why protocols.default_protocol(info, dataset) chose its protocol, in words (eval.py prints it)."""
    if info.get("format") == "train_seg":
        args = info.get("args") or {}
        if args.get("protocol") is None:
            return "the default: the checkpoint records none"
        if args.get("protocol") == "mmseg" and dataset not in protocols.MMSEG_TEST_BOX:
            return f"the checkpoint's is mmseg, which has no test setting for {dataset}"
        if args.get("recipe") in recipes.RECIPES and recipes.RECIPES[args["recipe"]]["protocol"] == args["protocol"]:
            return f"the checkpoint's recipe, {args['recipe']}"
        return "the checkpoint's: its run's final evaluation"
    if info.get("format") == "mmseg":
        if dataset not in protocols.MMSEG_TEST_BOX:
            return f"mmsegmentation has no test setting for {dataset}"
        return "mmsegmentation's file: its own single-scale test"
    if info.get("format") == "released":
        return "the default for the authors' files; --protocol released is their multi-scale test"
    return "the default"


def run_eval(args):
    model, info = zoo.load_model(args.checkpoint)
    if args.explain or args.explain_figure:
        explainable(model, "--explain" if args.explain else "--explain-figure")
    if args.explain_figure:
        explain_figure(model, info, args.checkpoint, args.explain_figure)
        return
    if args.export:
        export.export(model, info, args.export, model_protocol=protocols.default_protocol(info),
                      mmseg_box=protocols.MMSEG_TEST_BOX.get(info["dataset"]))
        print(f"{args.checkpoint} → {args.export} ({len(info['classes'])} classes; the input's normalisation, "
              "classes, palette and test-time procedure in its metadata"
              + ("; deploy.py runs it with onnxruntime)" if args.export.endswith(".onnx") else ")"))
        return
    name = args.data or info["dataset"]
    if name is None:
        fail(f"{args.checkpoint}: no known dataset has its {len(info['classes'])} classes; name one with --data")
    why = "--protocol" + (" and --multi-scale" if args.multi_scale else "")  # when given
    if args.protocol is None:  # the model's own, as protocols.segment's default
        args.protocol, why = protocols.default_protocol(info, name), default_protocol_reason(info, name)
        if name == "context" and args.protocol not in ("repo", "mmseg"):
            args.protocol, why = "repo", "the built-in context data's: its models see one scale only"
        if args.multi_scale:
            args.protocol = {"repo": "repo-ms", "mmseg": "mmseg-ms"}.get(args.protocol, args.protocol)
            why += ", with --multi-scale"
    args.protocol_reason = why
    if name == "context" and args.protocol not in ("repo", "mmseg"):
        what = "--multi-scale" if args.multi_scale else f"--protocol {args.protocol}"
        fail(f"{what} does not apply to the built-in context data: its models see its images at one scale only "
             f"(no scale augmentation), so other scales are inputs they never learnt")
    crop_size, base_size = args.crop_size or info["crop_size"], args.base_size or info["base_size"]
    rank, world, device = setup_distributed()
    amp = use_amp(args.amp, device)
    predictor = make_predictor(args.protocol, crop_size, base_size, name, amp, args.window_batch)
    model.to(device).eval()
    if amp and device.type == "cpu":  # oneDNN's bf16 convolutions want NHWC
        model.to(memory_format=torch.channels_last)
    if rank == 0:
        dtype = "bf16 (--amp)" if amp else "float32" + (" (--amp: no native bf16 here)" if args.amp else "")
        print(f"protocol {args.protocol} ({args.protocol_reason}), {dtype}", flush=True)

    if args.images:
        if rank == 0:
            files, skipped = list_images(args.images)
            plan = image_outputs(files, args.out, args.label_png, args.overwrite)
            pictures = explain_outputs(plan, args.overwrite) if args.explain else []
            print(f"{len(files)} images → {args.out}" + (f" (skipped {skipped})" if skipped else ""), flush=True)
            segmenter = partial(protocols.segment, model, info=info, protocol=args.protocol, crop_size=crop_size,
                                base_size=base_size, dataset=name, amp=amp, window_batch=args.window_batch)
            unreadable = segment_images(model, plan, info["palette"], device, segmenter, name, args.log_every)
            explain_photos(model, pictures, info["classes"], info["palette"], device, segmenter, base_size)
            if unreadable:
                raise errors.DataError(f"{len(unreadable)} of {len(files)} images could not be read: "
                                     f"{'; '.join(unreadable)}")
        end_distributed(world)
        return
    dataset = data.get_dataset(name, args.data_root or info.get("data_root"), args.split, crop_size, base_size,
                               mode="val")
    if dataset.num_classes != len(info["classes"]):
        fail(f"{args.checkpoint} predicts {len(info['classes'])} classes, {name} has {dataset.num_classes}")
    metric = evaluate(model, dataset, data.shard_indices(len(dataset), rank, world), device, predictor,
                      log_every=args.log_every if rank == 0 else 0)
    metric.all_reduce()
    if rank == 0:
        report(metric, dataset.classes, name, args.split, args.protocol, args.out, args.checkpoint,
               "bf16" if amp else "float32")
    end_distributed(world)


def report(metric, classes, name, split, protocol, out, checkpoint="", dtype="float32"):
    """Print the table and the scores; write the table to OUT/per_class_iou_{data}_{split}_{protocol}.txt and
    the scores to OUT/results_{data}_{split}_{protocol}.json (fractions, as train_seg.py's results.json)."""
    released = protocol == "released"
    pix_acc, miou = metric.pixacc_miou(absent_as_zero=released)
    table = per_class_table(metric, classes, released, f"{checkpoint} on {name} {split}, protocol {protocol}, {dtype}")
    print(table)
    stem = f"{name}_{split}_{protocol}"
    table_path, results_path = os.path.join(out, f"per_class_iou_{stem}.txt"), os.path.join(out, f"results_{stem}.json")
    intact = (f"the scores are printed above (pixAcc {100 * pix_acc:.2f} % mIoU {100 * miou:.2f} %); free space and "
              f"run the evaluation again to have them in {out}")
    with errors.writing(table_path, f"the per-class table {table_path}", intact):
        os.makedirs(out, exist_ok=True)
        with open(table_path, "w") as f:
            f.write(table + "\n")
    results = {"pixAcc": pix_acc, "mIoU": miou, "data": name, "split": split, "protocol": protocol,
               "checkpoint": str(checkpoint), "dtype": dtype}
    if name == "pcontext" and not protocol.startswith("mmseg"):  # Table 2's figure, derived as the authors do
        results["mIoU60"] = miou * 59 / 60
        print(f"mIoU with background as a 60th class (59/60 · mIoU): {100 * miou * 59 / 60:.2f} %")
    with errors.writing(results_path, f"the scores {results_path}", intact), open(results_path, "w") as f:
        json.dump(results, f)
    multi = " multi-scale" if protocol in ("repo-ms", "released", "mmseg-ms") else ""
    print(f"{name} {split}{multi}{'' if protocol.startswith('repo') else f' ({protocol} protocol)'}: "
          f"pixAcc {100 * pix_acc:.2f} % mIoU {100 * miou:.2f} % → {out}/results_{stem}.json")


def main(argv=None):
    run_or_exit(lambda: run_eval(parse_args(argv)))


if __name__ == "__main__":
    main()
