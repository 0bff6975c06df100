"""Train FCN or EncNet for semantic segmentation: the paper's recipe (Sec. 3.1), or that of a published model.

    python train_seg.py                                    # built-in context data, CPU, minutes
    python train_seg.py --model fcn                        # the FCN baseline on the same data
    torchrun --nproc_per_node 8 train_seg.py --data ade20k --data-root DATA    # ADE20K, 8 GPUs
    torchrun --nproc_per_node 4 train_seg.py --recipe encnet_resnet50s_ade --data-root DATA   # as published
    python train_seg.py --data folder --data-root MINE --init encnet_resnet50s_ade      # your own data (--data)

One process per GPU (or CPU process under gloo), synchronized BatchNorm across all of them,
poly learning rate per iteration, checkpoints that resume to the same weights as an
uninterrupted run (run.py holds that plumbing). Everything a run writes goes to --out:
checkpoint.pth, TensorBoard logs, results.json and the per-class IoU table.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import context_data
import data
import encnet
import explain
import protocols
import recipes
import run
import transforms
import zoo
from metric import SegMetric, evaluate, per_class_table
from protocols import make_predictor, predict, predicted_classes

# Arguments that define a run: a --resume that gives one of them must give the checkpoint's value.
RUN_DEFINING = (*encnet.ARCHITECTURE, "data", "split", "batch_size", "epochs", "max_iters", "lr", "min_lr",
                "poly_horizon", "head_lr_mult", "momentum", "weight_decay", "crop_size", "base_size", "random_scale",
                "scale_box", "blur", "max_rotation", "cat_max_ratio", "photometric", "pad", "seed", "se_weight",
                "aux_weight", "loss_mean", "loss_group", "recipe", "pretrained")


def size(text):
    """--crop-size, --scale-box: N (a square) or HxW, e.g. 512x1024."""
    try:
        sizes = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive size N or HxW")
    return sizes[0] if len(sizes) == 1 else sizes


def stages(text):
    """--recompute-stages: backbone stages 1–4, e.g. 3,4 (none: keep every activation) → '3,4' or 'none'."""
    try:
        numbers = [] if text.lower() == "none" else [int(v) for v in text.split(",")]
    except ValueError:
        numbers = [0]
    if not set(numbers) <= {1, 2, 3, 4}:
        run.fail(f"--recompute-stages {text}: backbone stages among 1, 2, 3, 4 (e.g. 3,4), or none")
    return ",".join(map(str, sorted(set(numbers)))) or "none"


def get_args(argv=None):
    """The run's arguments: the command line, then --resume's checkpoint, then the recipe for what is unset;
    checked (check_args) before any work."""
    p = argparse.ArgumentParser(description=__doc__, epilog=recipes.recipe_table(), formatter_class=run.HelpFormatter,
                                allow_abbrev=False)
    recipe_flag = argparse.BooleanOptionalAction  # --x / --no-x, default from the recipe
    g = p.add_argument_group("data")
    g.add_argument("--data", default="context", choices=sorted(recipes.DATASET_RECIPES),
                   help="dataset (context: built in, no download). folder: your own data under --data-root: "
                        "ROOT/classes.json {\"classes\": [names], \"palette\": [[r, g, b], ...] (optional)}, "
                        "ROOT/images/{train,val}/NAME.jpg, ROOT/labels/{train,val}/NAME.png (class indices, 255 "
                        "unlabelled, or the palette's colours; subfolders mirrored); the paper's recipe, 50 epochs at "
                        "lr 0.01, or a --recipe NAME's. A small dataset (hundreds of images) has few iterations per "
                        "epoch: set the length with --max-iters (thousands), a crop near the images' size (e.g. "
                        "--crop-size 256 --base-size 288; fewer pixels also suit a CPU), and keep pretrained weights "
                        "(--pretrained imagenet, the default, or --init NAME of a published model)")
    g.add_argument("--recipe", choices=sorted(recipes.RECIPES),
                   help="train a published model as it was trained (its dataset, model, schedule, loss, "
                        "augmentation and evaluation; see the table below)")
    g.add_argument("--data-root", help="folder holding the dataset in its standard layout (real datasets)")
    g.add_argument("--split", default="train", help="training split, e.g. train, train+val, train_aug")
    g.add_argument("--crop-size", type=size, help="training crop, N or HxW (paper: 480)")
    g.add_argument("--base-size", type=int, help="long side before random scaling 0.5–2 (paper: 520)")
    g.add_argument("--random-scale", choices=["long", "short", "box"],
                   help="the random scale 0.5–2: of the long side × base (paper, released code), of the short side "
                        "(the released v0.5.0 that trained its zoo), or the image fit into --scale-box × U(0.5, 2) "
                        "(mmsegmentation's RandomResize)")
    g.add_argument("--scale-box", type=size, help="LONGxSHORT of --random-scale box, e.g. 2048x512")
    g.add_argument("--blur", action=recipe_flag, help="Gaussian blur, radius U(0, 1), of half the crops (released v0.5.0)")
    g.add_argument("--workers", type=int, help="data loader processes per training process")
    g.add_argument("--check-train", action=argparse.BooleanOptionalAction, default=True,
                   help="decode every training image and label before training, so that a bad file stops the run "
                        "before it starts (the validation split is always checked)")
    g.add_argument("--max-rotation", type=float, help="random rotation within ±degrees (paper: 10)")
    g.add_argument("--cat-max-ratio", type=float,
                   help="redraw a crop (up to 10 times) where one class covers more than this share (mmsegmentation)")
    g.add_argument("--photometric", action=recipe_flag,
                   help="mmsegmentation's photometric distortion (brightness, contrast, saturation, hue)")
    g.add_argument("--pad", choices=["black", "mean"],
                   help="colour of the padding around small crops: black (released code) or the mean colour, "
                        "0 after normalisation (mmsegmentation)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="encnet", choices=["encnet", "fcn"], help="EncNet or the FCN baseline")
    g.add_argument("--backbone", choices=sorted(encnet.ARCHITECTURES), help="dilated ResNet (paper: resnet50)")
    g.add_argument("--pretrained", help="backbone weights: 'imagenet' (the published ones of the backbone, "
                                        "see zoo.IMAGENET_WEIGHTS), a path or a URL; 'none' to train from scratch")
    g.add_argument("--width", type=int, help="backbone base width (64 = standard ResNet)")
    g.add_argument("--head-width", type=int, help="channels of the head (paper: 512)")
    g.add_argument("--num-codes", type=int, default=32, help="codewords K (0 = global average pooling, Fig. 5)")
    g.add_argument("--se-loss", action=recipe_flag, default=True, help="the SE-losses of EncNet (Sec. 2.2)")
    g.add_argument("--se-weight", type=float, default=0.2, help="α of the SE-loss (paper: 0.2)")
    g.add_argument("--aux", action=recipe_flag, help="auxiliary FCN head on stage 3 (both zoos)")
    g.add_argument("--aux-weight", type=float, help="weight of the auxiliary loss (released code 0.2, mmsegmentation 0.4)")
    g.add_argument("--lateral", action=recipe_flag, help="fuse stage 2–3 features into the head (released code, PASCAL)")
    g.add_argument("--residual-gate", action=recipe_flag,
                   help="relu(x + x⊗γ) as in the released code, instead of the paper's x⊗γ")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout before the classifiers")
    g.add_argument("--dropout2d", action=recipe_flag, help="channel-wise dropout there (mmsegmentation)")
    g.add_argument("--stage3-encoding", action=recipe_flag,
                   help="the stage-3 Context Encoding Module of Fig. 3 and its SE-loss (neither zoo has it)")
    g.add_argument("--align-corners", action=recipe_flag,
                   help="bilinear upsampling with align_corners=True (the released code)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch, split over processes (paper: 16)")
    g.add_argument("--epochs", type=int, help="paper: 120 ADE20K, 50 PASCAL")
    g.add_argument("--max-iters", type=int, help="total iterations (overrides --epochs)")
    g.add_argument("--lr", type=float,
                   help="base learning rate of the poly schedule (paper: 0.01 ADE20K, 0.001 others)")
    g.add_argument("--head-lr-mult", type=float, help="lr multiplier of the head (paper: 1, released code: 10)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    g.add_argument("--weight-decay", type=float, help="on every weight, BatchNorm's included (paper: 1e-4)")
    g.add_argument("--min-lr", type=float, help="the poly schedule ends here (mmsegmentation: 1e-4)")
    g.add_argument("--poly-horizon", choices=["iters", "iters-1"],
                   help="N of lr·(1 − it/N)^0.9: the iterations (paper, released code) or one fewer (mmengine's PolyLR)")
    g.add_argument("--loss-mean", choices=["labelled", "all"],
                   help="per-pixel losses averaged over the labelled pixels (PyTorch's ignore_index mean, "
                        "released code) or over all pixels, ignored ones included (mmsegmentation)")
    g.add_argument("--loss-group", type=int,
                   help="that mean taken over each group of N images of the global batch, then averaged over the "
                        "groups (released code: 4, one group per GPU); 0: the whole batch")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order, augmentation and dropout")
    g = run.add_run_arguments(p, out="runs/seg", log_every=5.0)
    g.add_argument("--init", help="fine-tune: start from the weights of a train_seg.py checkpoint, a published "
                                  "model's file or its name (see zoo.load_model), fresh optimizer and schedule; "
                                  "the model's architecture is the file's")
    g.add_argument("--val-every", type=int, default=0, help="quick validation every N epochs (0: only at the end)")
    g.add_argument("--recompute-stages", type=stages, default="none",
                   help="backbone stages recomputed in backward instead of kept (e.g. 3,4 or 1,2,3,4): the same "
                        "numbers in less memory for more time (docs/performance.md)")
    g.add_argument("--protocol", choices=["repo", "released", "mmseg"],
                   help="the final evaluation's protocol (eval.py --protocol; single-scale for repo and mmseg)")
    # Not flags: the run's record, kept in its checkpoint's args and restored by --resume. began_from: how its
    # weights began (starting_model; never changed after); command_flags: the flags its command lines gave.
    p.set_defaults(began_from=None, command_flags=[])
    args = p.parse_args(argv)
    explicit = run.explicit_flags(p, argv)
    if args.resume and "init" in explicit:
        run.fail("--resume and --init contradict each other: resume continues this run, init starts a new one")
    if args.pretrained in ("none", ""):
        args.pretrained = None  # from scratch: None, on the command line as in the checkpoint
    restored = set()  # what --resume took from the checkpoint: the recipe does not fill it again
    if run.resuming(args):
        saved = zoo.read_checkpoint(os.path.join(args.out, "checkpoint.pth"))["args"]
        for note in run.continue_run(args, saved, explicit, RUN_DEFINING):
            run.warn(note)
        restored = {k for k in saved if hasattr(args, k) and k not in explicit}
    args.command_flags = sorted(set(args.command_flags or ()) | explicit - {"resume", "out"})
    recipe = recipes.RECIPES[args.recipe] if args.recipe else recipes.DATASET_RECIPES[args.data]
    if args.recipe:
        own_data = args.data == "folder"  # the recipe on your own data (given, or the resumed run's)
        if "data" in explicit and args.data != recipe["data"] and not own_data:
            run.fail(f"--recipe {args.recipe} trains on {recipe['data']}, not --data {args.data} (--data folder, "
                     f"your own data, may replace it)")
        if not own_data:
            args.data = recipe["data"]
    length_in_epochs = args.epochs is not None  # then a recipe's iteration count does not apply
    for key, value in recipe.items():
        if key == "max_iters" and length_in_epochs or key == "data" or key in explicit or key in restored:
            continue  # (a run resumed from scratch keeps pretrained None: the recipe's 'imagenet' is not its)
        if getattr(args, key) is None:
            setattr(args, key, run.default_workers(value) if key == "workers" else value)
    if args.init and not args.resume:
        if args.pretrained and "pretrained" in explicit:
            run.fail(f"--init and --pretrained contradict each other: the run begins from every weight of --init "
                     f"{args.init}, its backbone's included")
        args.pretrained = None  # the --init file's weights, not the recipe's ImageNet ones: the record says so
    if args.protocol == "mmseg" and args.data not in protocols.MMSEG_TEST_BOX:
        if "protocol" in explicit:
            run.fail(f"--protocol mmseg: mmsegmentation has no test setting for --data {args.data}; use --protocol "
                     f"repo or released")
        args.protocol = "repo"  # an mmsegmentation recipe on your own data: evaluated with this repo's protocol
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any work, each with one clear message."""
    run.check_run_args(args)
    if args.num_codes < 0:
        run.fail(f"--num-codes {args.num_codes}: must be 0 (global average pooling) or more")
    if args.base_size <= 0:
        run.fail(f"--base-size {args.base_size}: must be positive")
    if not 0 <= args.dropout < 1:
        run.fail(f"--dropout {args.dropout}: a probability in [0, 1)")
    if args.loss_group < 0 or args.loss_group and args.batch_size > args.loss_group and args.batch_size % args.loss_group:
        run.fail(f"--loss-group {args.loss_group}: must divide --batch-size {args.batch_size} (0: the whole batch)")
    if args.random_scale == "box" and not args.scale_box:
        run.fail("--random-scale box needs --scale-box LONGxSHORT (mmsegmentation's ADE20K: 2048x512)")
    if args.data == "context" and (args.crop_size, args.base_size) != (context_data.CONTEXT_WIDTH, context_data.CONTEXT_WIDTH):
        run.fail(f"--crop-size {args.crop_size} --base-size {args.base_size}: the built-in images "
                 f"({context_data.CONTEXT_HEIGHT}×{context_data.CONTEXT_WIDTH}) are used whole, both must be {context_data.CONTEXT_WIDTH}")
    if args.data != "context" and not args.data_root:
        run.fail(f"--data {args.data} needs --data-root (the folder holding the dataset)")
    if args.data_root and not os.path.isdir(args.data_root):
        run.fail(f"--data-root {args.data_root} does not exist")


# ----------------------------------------------------------------------------- the recipe's pieces

def build_optimizer(model, args):
    """SGD with weight decay on every weight; the head (everything but the backbone) at head_lr_mult × lr
    (released code: 10×)."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone, "lr_mult": 1.0}, {"params": head, "lr_mult": args.head_lr_mult}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def poly_lr(optimizer, base_lr, it, horizon, min_lr=0.0, power=0.9):
    """lr = (base − min) · (1 − it/horizon)^0.9 + min, set before iteration `it` (from 0) of every group
    (Sec. 3.1; min 0 in the paper). horizon: the run's iterations (paper, released code) or one fewer
    (mmengine's PolyLR, whose last iteration trains at exactly min_lr); see lr_horizon."""
    lr = (base_lr - min_lr) * (1 - min(it, horizon) / horizon) ** power + min_lr
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr


def lr_horizon(total_iters, poly_horizon):
    """N of the poly schedule: 'iters' = the run's iterations, 'iters-1' = mmengine's end − begin − 1."""
    return max(1, total_iters - 1) if poly_horizon == "iters-1" else total_iters


def loss_divisors(labels, loss_mean, loss_group, world=1, rank=0):
    """What this process divides each image's summed per-pixel losses by (B), so that DDP's average over the
    processes is the recipe's mean over the global batch:
      loss_mean 'labelled': over labelled pixels (PyTorch's ignore_index mean); 'all': over all pixels, ignored
      ones included (mmsegmentation's avg_non_ignore=False);
      loss_group N: the mean of each group of N consecutive images of the global batch, averaged over the
      groups (the released code's DataParallelCriterion: one mean per GPU, 4 images each); 0: one group.
    The counts are all-reduced (ranks may hold different numbers of labelled pixels), queued on the device like
    any kernel: the host does not wait for them."""
    b = labels.shape[0]
    counted = (labels != -1).flatten(1).sum(1).float() if loss_mean == "labelled" else float(labels[0].numel())
    counts = torch.zeros(b * world, device=labels.device)  # the global batch, in rank order
    counts[rank * b:(rank + 1) * b] = counted
    if world > 1:
        dist.all_reduce(counts)
    group = min(loss_group or len(counts), len(counts))
    per_group = counts.view(-1, group).sum(1).clamp_min(1)
    return per_group.repeat_interleave(group)[rank * b:(rank + 1) * b] * (len(per_group) / world)


def train_step(net, optimizer, images, labels, args, world=1, rank=0):
    """One SGD iteration of the recipe: forward, loss, backward, update (what the loop runs, and what the
    tests compare with the reference code's step). images: B×3×H×W normalised, labels: B×H×W (−1 ignored),
    both on the device. → (loss, terms, grad_norm) as tensors on the device: no host sync here."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=args.amp):
        outputs = net(images)
    divisors = loss_divisors(labels, args.loss_mean, args.loss_group, world, rank)
    loss, terms = encnet.seg_loss(outputs, labels, args.num_classes, args.se_weight, args.aux_weight, divisors)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # the norm only: no clipping
    optimizer.step()  # bf16 needs no loss scaling: no step is ever skipped
    return loss, terms, grad_norm


def starting_model(args, world, checkpoint, checkpoint_path, classes=None):
    """The model with its first weights: the checkpoint's (--resume), another run's or a published
    model's (--init; classes: the names of the training data's classes), or fresh with the backbone's
    pretrained weights (rank 0 fetches them first, so that the other processes find them in torch.hub's cache)."""
    if args.init and checkpoint is None:
        return init_model(args, classes)
    torch.manual_seed(args.seed)  # the same initial weights on every process, whatever ran before
    model = encnet.model_from_args(vars(args))
    if checkpoint is not None:
        zoo.load_strict(model, checkpoint["model"], checkpoint_path)
    elif args.pretrained:
        is_main = int(os.environ.get("RANK", 0)) == 0
        if world > 1 and not is_main:
            dist.barrier()
        zoo.load_backbone_weights(model.backbone, args.pretrained, args.backbone)
        if world > 1 and is_main:
            dist.barrier()
    if checkpoint is None or not args.began_from:  # a resumed run keeps its record (older checkpoints lack one)
        args.began_from = weights_origin(args)
    return model


def weights_origin(args, info=None):
    """How a run's weights began, in words: args.began_from, set when the run starts and kept by its checkpoints
    ever after (the start line: 'from …', 'initialised from …', 'resumed from iteration N of a run that began
    from …'). info: zoo.load_model's, of an --init file."""
    if args.init:
        if info is None:
            return f"{args.init} (--init)"
        where = {"train_seg": "a train_seg.py checkpoint", "released": "the authors' model zoo",
                 "mmseg": "mmsegmentation's model zoo"}.get(info["format"], info["format"])
        trained_on = info["dataset"] or f"data of {info['num_classes']} classes"
        return f"{args.init} (--init: {where}, {info['args'].get('model', 'encnet')} {info['backbone']} on {trained_on})"
    if args.pretrained:
        return f"{args.pretrained} weights for the {args.backbone} backbone"
    return "scratch (no pretrained weights)"


# What --init leaves to the training command: which model to train and what to learn with it.
TRAINING_CHOICES = ("model", "se_loss", "stage3_encoding", "dropout")
# Modules that only training uses (their outputs are losses, not the segmentation): they may be
# missing from an --init file and start fresh. Neither zoo has the stage-3 Context Encoding Module.
TRAINING_ONLY = ("stage3_encoding.", "aux_head.", "enc_module.se_classifier.")
# The layers whose shapes are the class count: fresh when fine-tuning on a dataset with other classes.
CLASS_LAYERS = ("classifier.1.", "head.2.", "enc_module.se_classifier.", "aux_head.2.", "stage3_encoding.se_classifier.")


def init_model(args, classes=None):
    """--init: a new run from the weights of another run (e.g. COCO → VOC) or of a published model.

    The architecture is the file's (backbone, head, gate, upsampling: args are updated, so that the
    run's checkpoint records it). Training-only modules the file lacks start fresh, and so do the
    class-specific layers when --data has other classes than the file (another count, or with `classes`
    given, other names: your own data with as many classes as the file); they are named in one line.
    Every other weight must come from the file, and everything in the file must fit."""
    source, info = zoo.load_model(args.init)
    for key in encnet.ARCHITECTURE:
        if key not in TRAINING_CHOICES:
            setattr(args, key, info["args"].get(key, encnet.ARCHITECTURE[key]))
    torch.manual_seed(args.seed)  # the fresh layers' initial weights
    model = encnet.model_from_args(vars(args))
    state = source.state_dict()
    other_classes = info["num_classes"] != args.num_classes or \
        classes is not None and [str(c) for c in classes] != [str(c) for c in info["classes"]]
    fresh_prefixes = TRAINING_ONLY + (CLASS_LAYERS if other_classes else ())
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(fresh_prefixes)
             and (k not in state or state[k].shape != v.shape or other_classes and k.startswith(CLASS_LAYERS))}
    kept = {k: v for k, v in state.items() if k not in fresh}
    zoo.load_strict(model, {**kept, **fresh}, args.init)
    if fresh and int(os.environ.get("RANK", 0)) == 0:
        whole = [p for p in fresh_prefixes if all(k in fresh for k in model.state_dict() if k.startswith(p))]
        modules = sorted({min((p for p in whole if k.startswith(p)), key=len).rstrip(".") for k in fresh})
        others = " other" if info["num_classes"] == args.num_classes else ""
        why = (f" (the file predicts {info['num_classes']} classes of {info['dataset']}, --data {args.data} has "
               f"{args.num_classes}{others})" if other_classes else "")
        print(f"--init {args.init}: {len(fresh)} tensors start fresh{why}: {', '.join(modules)}", flush=True)
    args.began_from = weights_origin(args, info)
    return model


def validation_images(model, dataset, device, args, count=4):
    """input | ground truth | prediction strips in class colours, for TensorBoard (3×H×(3W) uint8 each)."""
    palette = torch.tensor(dataset.palette, dtype=torch.uint8)
    strips = []
    for i in range(min(count, len(dataset))):
        image, label = dataset[i]
        probs = predict(model, transforms.normalize(image[None].to(device)), protocols.eval_crop(args.crop_size, args.base_size),
                        args.base_size, amp=args.amp)
        pred = predicted_classes(probs)[0].cpu()
        strips.append(torch.cat([image, data.colorize(label, palette), data.colorize(pred, palette)], 2))
    return strips


def log_explanations(model, dataset, device, args, writer, step, count=4):
    """TensorBoard, beside the validation strips: what the Context Encoding Module saw in the same first `count`
    validation images (explain.py), so that a run shows when the model learns the scene:
      val/assignment/{i}  the codeword assignment map at the image's size (strongest codeword's colour, its
                          weight a_ik as brightness)
      val/presence/{i}    the SE head's class-presence probabilities, the classes of the true label marked
    Each image is seen whole with its long side at base size (explain.at_long_side). Nothing for a model
    without the module (FCN) or with K = 0 codewords."""
    try:
        explain.context_module(model)
    except ValueError:
        return
    for i in range(min(count, len(dataset))):
        image, label = dataset[i]
        view = explain.module_view(model, explain.at_long_side(transforms.normalize(image[None].to(device)),
                                                               args.base_size))
        for name, picture in explain.tensorboard_views(view, dataset.classes, label=label).items():
            writer.add_image(f"val/{name}/{i}", picture, step)


def quick_validation(model, dataset, rank, world, device, args):
    """Fixed resize + centre crop, batched; confusion matrices summed over processes.
    (The unwrapped model: DDP's forward could wait on a collective when shards differ in length.)"""
    model.eval()
    metric = SegMetric(dataset.num_classes)
    loader = DataLoader(torch.utils.data.Subset(dataset, data.shard_indices(len(dataset), rank, world)),
                        batch_size=max(1, args.batch_size // world), num_workers=args.workers,
                        worker_init_fn=run.loader_worker_signals)  # runs inside training: a stop request waits
    with torch.no_grad():
        for images, labels in loader:
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = model(transforms.normalize(images.to(device)))
            metric.update(predicted_classes(logits).cpu(), labels)
    metric.all_reduce()
    model.train()
    return metric.pixacc_miou()


def final_evaluation(model, dataset, rank, world, device, args, writer, it):
    """Whole images with the recipe's protocol (single-scale for 'repo' and 'mmseg', the authors' multi-scale for
    'released') → results.json, per_class_iou.txt, TensorBoard; for PASCAL-Context also the paper's 60-class figure,
    mIoU · 59/60, as eval.py gives it (results.json 'mIoU60'). → (pixAcc, mIoU)."""
    crop = protocols.eval_crop(args.crop_size, args.base_size)
    predictor = make_predictor(args.protocol, crop, args.base_size, args.data, amp=args.amp)
    metric = evaluate(model, dataset, data.shard_indices(len(dataset), rank, world), device, predictor)
    metric.all_reduce()
    absent_as_zero = args.protocol == "released"
    pix_acc, miou = metric.pixacc_miou(absent_as_zero)
    if rank == 0:
        writer.add_scalar("val/pixAcc", pix_acc, it)
        writer.add_scalar("val/mIoU", miou, it)
        for i, strip in enumerate(validation_images(model, dataset, device, args)):
            writer.add_image(f"val/input_truth_prediction/{i}", strip, it)
        log_explanations(model, dataset, device, args, writer, it)
        header = f"{args.data} {args.split} → val, protocol {args.protocol}, {it} iterations, {args.out}/checkpoint.pth"
        table = per_class_table(metric, dataset.classes, absent_as_zero, header)
        table_path = os.path.join(args.out, "per_class_iou.txt")
        with writer.writing(table_path, f"the per-class table {table_path}"), open(table_path, "w") as f:
            f.write(table + "\n")
        results = {"pixAcc": pix_acc, "mIoU": miou}  # the contract; the table's header says how
        if args.data == "pcontext" and not args.protocol.startswith("mmseg"):  # Table 2's figure, as eval.py's
            results["mIoU60"] = miou * 59 / 60
            writer.add_scalar("val/mIoU60", results["mIoU60"], it)
        results_path = os.path.join(args.out, "results.json")
        with writer.writing(results_path, f"the final scores {results_path}"), open(results_path, "w") as f:
            json.dump(results, f)
        print(table)
        if "mIoU60" in results:
            print(f"mIoU with background as a 60th class (59/60 · mIoU): {100 * results['mIoU60']:.2f} %")
        print(f"final: pixAcc {100 * pix_acc:.2f} % mIoU {100 * miou:.2f} % ({args.model}, {args.data}, {it} "
              f"iterations, protocol {args.protocol}) → {args.out}/results.json", flush=True)
    return pix_acc, miou


def run_recipe(args):
    """The recipe the run's unset flags came from: --recipe NAME's, or --data NAME's (recipes.py)."""
    return recipes.RECIPES[args.recipe] if args.recipe else recipes.DATASET_RECIPES[args.data]


# The settings that no recipe holds (their flags' defaults), shown after the recipe's.
OTHER_SETTINGS = ("model", "num_codes", "se_loss", "se_weight", "dropout", "momentum", "seed", "split", "val_every",
                  "check_train", "amp", "channels_last", "compile", "recompute_stages")


def shown(value):
    return ("on" if value else "off") if isinstance(value, bool) else "none" if value is None else \
        f"{value:g}" if isinstance(value, float) else recipes.show(value)


def settings(args):
    """Every setting of the run → [(name, value as shown, where it came from)], the recipe's keys first (in the
    recipe's order), then OTHER_SETTINGS, then the rest of the args. Where from: 'flag' (a command line of the
    run gave it), '--init' (the --init file's architecture, which wins over flags; no pretrained weights), 'recipe'
    or 'default' (the flag's own default)."""
    recipe, values = run_recipe(args), run.plain_args(args)
    from_init = {k for k in encnet.ARCHITECTURE if k not in TRAINING_CHOICES} | {"pretrained"} if args.init else set()
    order = [k for k in recipe if k != "data"] + [k for k in OTHER_SETTINGS if k not in recipe]
    order += [k for k in values if k not in order and k not in ("began_from", "command_flags")]
    rows = []
    for key in order:
        source = ("--init" if key in from_init else "flag" if key in args.command_flags else
                  "recipe" if key in recipe else "default")
        rows.append((key, shown(values.get(key)), source))
    return rows


def settings_markdown(args, start_line):
    """The run's settings as the Markdown table TensorBoard's text tab shows (writer.add_text 'settings')."""
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    return "\n".join([f"    {line}" for line in start_line.splitlines()] + [
        "", "| setting | value | from |", "|---|---|---|",
        *(f"| {key.replace('_', '-')} | {escape(value)} | {source} |" for key, value, source in settings(args)),
        f"| weights began from | {escape(args.began_from)} | the run's record |"])


def precision(args, device):
    """Whether the run computes in bf16 (--amp) or float32, in words."""
    if not args.amp:
        return "float32"
    slow = device.type == "cpu" and not run.cpu_has_fast_bf16()
    return f"bf16 autocast (--amp){', emulated on this CPU: slow' if slow else ''}"


def describe(args, plan, world, device, start, num_images):
    """The start line: what is trained, on what, from which weights (args.began_from), and every setting: the
    recipe's keys, '(flag)' where a command line of the run set one, '(--init)' where the --init file did."""
    recipe = f"--recipe {args.recipe}" if args.recipe else f"the {args.data} defaults"
    if args.resume:
        weights = f"resumed from iteration {start} of a run that began from {args.began_from}"
    else:
        weights = f"{'initialised ' if args.init else ''}from {args.began_from}"
    rows, keys = settings(args), set(run_recipe(args))
    unused = {"epochs"} if args.max_iters else set()  # --max-iters sets the length

    def item(key, value, source):
        mark = f" ({source})" if source in ("flag", "--init") else ""
        return f"{key.replace('_', '-')} {value}{mark}{' (unused: --max-iters sets the length)' if key in unused else ''}"
    def wrap(head, items, width=118):  # lines broken between items only
        lines = [head]
        for i, text in enumerate(items):
            text += "," if i < len(items) - 1 else ""
            if len(lines[-1]) + 1 + len(text) > width:
                lines.append(" ")
            lines[-1] += " " + text
        return "\n".join(lines)
    return "\n".join([
        f"{args.model} on {args.data} ({num_images} train images, {args.num_classes} classes), {world} process(es) "
        f"on {device.type}, {plan.total_iters} iterations from {start}, {precision(args, device)}",
        f"weights: {weights}",
        wrap(f"recipe ({recipe}; '(flag)': set on the command line):", [item(*row) for row in rows if row[0] in keys]),
        wrap("other settings:", [item(*row) for row in rows if row[0] in OTHER_SETTINGS and row[0] not in keys])])


# ----------------------------------------------------------------------------- training

def train(args):
    rank, world, device = run.setup_distributed()
    is_main = rank == 0
    train_set = data.get_dataset(args.data, args.data_root, args.split, args.crop_size, args.base_size,
                                 seed=args.seed, max_rotation=args.max_rotation, cat_max_ratio=args.cat_max_ratio,
                                 photometric=args.photometric, scale_rule=args.random_scale, scale_box=args.scale_box,
                                 blur=args.blur, pad=args.pad)
    val_quick = data.get_dataset(args.data, args.data_root, "val", args.crop_size, args.base_size, mode="center")
    val_full = data.get_dataset(args.data, args.data_root, "val", args.crop_size, args.base_size, mode="val")
    args.num_classes = train_set.num_classes
    # The splits are read now, not hours into training (each process its shard): every image and label decoded.
    data.check_dataset(val_full, max(1, args.workers), data.shard_indices(len(val_full), rank, world))
    frequencies = []  # the share of each class in the training split, counted while it is checked
    if args.check_train and not args.resume:
        histogram = np.zeros(256, np.int64)
        data.check_dataset(train_set, max(1, args.workers), data.shard_indices(len(train_set), rank, world),
                           histogram=histogram)
        if isinstance(train_set, data.SegmentationDataset):
            counts = torch.from_numpy(data.class_pixel_counts(train_set, histogram))
            if world > 1:
                counts = counts.to(device)
                dist.all_reduce(counts)
            frequencies = data.class_frequencies(train_set.classes, counts.cpu().numpy(), f"training ({args.split})")

    checkpoint_path = os.path.join(args.out, "checkpoint.pth")
    checkpoint = zoo.read_checkpoint(checkpoint_path) if args.resume else None
    model = starting_model(args, world, checkpoint, checkpoint_path, train_set.classes)
    if args.recompute_stages != "none":  # torch.utils.checkpoint, the running statistics counted once
        model.backbone.checkpoint_stages = tuple(int(v) for v in args.recompute_stages.split(","))
    model, net = run.distribute(model, world, device, args.channels_last, args.compile)
    optimizer = build_optimizer(model, args)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    plan = run.schedule(len(train_set), args.batch_size, args.epochs, args.max_iters, args.save_every)
    horizon = lr_horizon(plan.total_iters, args.poly_horizon)
    start = checkpoint["iter"] if checkpoint is not None else 0
    sampler = data.ShardedBatchSampler(len(train_set), args.batch_size, rank, world, seed=args.seed)
    writer = None
    if is_main:
        writer = run.EventLog(args.out)  # creates --out: only now that data and weights are in place
        start_line = describe(args, plan, world, device, start, len(train_set))
        print(start_line, flush=True)
        writer.add_text("settings", settings_markdown(args, start_line), start)  # TensorBoard's text tab
        if frequencies:
            print("\n".join(frequencies), flush=True)

    def checkpoint_state(it):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                "epoch": it // plan.iters_per_epoch, "args": run.plain_args(args), "classes": list(train_set.classes),
                "palette": [list(c) for c in train_set.palette]}

    with run.Bookkeeping(plan, start, world, writer, log_every=args.log_every, global_batch=args.batch_size,
                         device=device, checkpoint_path=checkpoint_path, checkpoint=checkpoint_state,
                         model=model) as book:
        for it, (images, labels) in run.batches(train_set, sampler, plan, start, args.workers, device):
            run.seed_step(args.seed, it, model, rank, len(labels))  # dropout: the same masks for any world size
            lr = poly_lr(optimizer, args.lr, it, horizon, args.min_lr)
            images = transforms.normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            loss, terms, grad_norm = train_step(net, optimizer, images, labels.to(device, non_blocking=True), args,
                                                world, rank)
            book.after_step(it + 1, loss=loss, **terms, grad_norm=grad_norm, lr=lr)
            if plan.validation_due(it + 1, args.val_every):
                pix_acc, miou = quick_validation(model, val_quick, rank, world, device, args)
                if is_main:
                    print(f"epoch {(it + 1) // plan.iters_per_epoch} | quick val pixAcc {100 * pix_acc:.2f} % "
                          f"mIoU {100 * miou:.2f} %", flush=True)
                    writer.add_scalar("val/pixAcc", pix_acc, it + 1)
                    writer.add_scalar("val/mIoU", miou, it + 1)
                    log_explanations(model, val_full, device, args, writer, it + 1)

    result = final_evaluation(model, val_full, rank, world, device, args, writer, plan.total_iters)
    if is_main:
        writer.close()
    del net  # DDP's reducer holds the process group, which must not outlive the run (run.end_distributed)
    run.end_distributed(world)
    return result


def main(argv=None):
    run.run_or_exit(lambda: train(get_args(argv)))


if __name__ == "__main__":
    main()
