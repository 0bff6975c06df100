"""Train FCN or EncNet for semantic segmentation with the paper's recipe (Sec. 3.1).

    python train_seg.py                                    # built-in context data, CPU, minutes
    python train_seg.py --model fcn                        # the FCN baseline on the same data
    torchrun --nproc_per_node 8 train_seg.py --data ade20k --data-root DATA    # ADE20K, 8 GPUs

One process per GPU (or CPU process under gloo), synchronized BatchNorm across all of them,
poly learning rate per iteration, checkpoints that resume to the same weights as an
uninterrupted run (run.py holds that plumbing). Everything a run writes goes to --out:
checkpoint.pth, TensorBoard logs, results.json and the per-class IoU table.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import data
import encnet
import run
from eval import SegMetric, colorize, evaluate, per_class_table, predict, predicted_classes

# Each dataset's recipe: the paper's (Sec. 3.1) for the datasets it trained on, mmsegmentation's for
# Cityscapes, a CPU-sized one for the built-in data. A flag left unset takes its dataset's value.
PAPER_RECIPE = dict(batch_size=16, crop_size=480, base_size=520, backbone="resnet50", pretrained="imagenet",
                    width=64, head_width=512, head_lr_mult=1.0, workers=8, weight_decay=1e-4, min_lr=0.0,
                    max_iters=None, aux=False, aux_weight=0.2, residual_gate=False, stage3_encoding=True,
                    dropout2d=False, max_rotation=10.0, cat_max_ratio=None, photometric=False)
DEFAULTS = {
    "ade20k": dict(PAPER_RECIPE, lr=0.01, epochs=120),
    "pcontext": dict(PAPER_RECIPE, lr=0.001, epochs=50),
    "pascal_voc": dict(PAPER_RECIPE, lr=0.001, epochs=50),
    "pascal_aug": dict(PAPER_RECIPE, lr=0.001, epochs=50),
    # COCO pretraining for VOC (Sec. 3.3): base lr 0.01 per the paper; it does not give the epochs.
    "coco": dict(PAPER_RECIPE, lr=0.01, epochs=30),
    # mmsegmentation's EncNet-R50 Cityscapes recipe (77.94 mIoU), from encnet_r50-d8_512x1024_80k_cityscapes.py
    # and its bases: _base_/schedules/schedule_80k.py (SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly
    # power 0.9 down to min_lr 1e-4, 80k iterations), _base_/datasets/cityscapes.py (2048×1024 scaled by
    # 0.5–2, crop 512×1024 with cat_max_ratio 0.75, flip, photometric distortion, no rotation; 4 GPUs × 2
    # images) and _base_/models/encnet_r50-d8.py (EncHead: residual gate, Dropout2d, no stage-3 module;
    # auxiliary FCN head on stage 3 at weight 0.4; SE-loss 0.2). One difference: its backbone is ResNetV1c
    # with open-mmlab's ImageNet weights, here torchvision's ResNet-50 (`--backbone resnet50v1c
    # --pretrained PATH` takes theirs).
    "cityscapes": dict(PAPER_RECIPE, lr=0.01, epochs=None, max_iters=80000, batch_size=8, crop_size=[512, 1024],
                       base_size=2048, weight_decay=5e-4, min_lr=1e-4, aux=True, aux_weight=0.4, residual_gate=True,
                       stage3_encoding=False, dropout2d=True, max_rotation=0.0, cat_max_ratio=0.75, photometric=True),
    "context": dict(PAPER_RECIPE, lr=0.02, epochs=3, crop_size=320, base_size=320, head_lr_mult=10.0,
                    backbone="resnet18", pretrained=None, width=16, head_width=64, workers=0),
}


# Arguments that must agree between a checkpoint and the command that resumes it.
RUN_DEFINING = (*encnet.ARCHITECTURE, "data", "split", "batch_size", "epochs", "max_iters", "lr", "min_lr",
                "head_lr_mult", "momentum", "weight_decay", "crop_size", "base_size", "max_rotation", "cat_max_ratio",
                "photometric", "seed", "se_weight", "aux_weight")


def recipe_table():
    """The per-dataset defaults, for --help."""
    keys = ["lr", "epochs", "batch_size", "max_iters", "crop_size", "base_size", "backbone", "pretrained"]
    show = lambda v: "x".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    rows = [f"  {'--data':<11}" + "".join(f"{k:>11}" for k in keys)]
    rows += [f"  {name:<11}" + "".join(f"{show(recipe[k]):>11}" for k in keys) for name, recipe in DEFAULTS.items()]
    return ("per-dataset defaults of the flags left unset (loader workers: 8, capped at the CPU cores; "
            "cityscapes: mmsegmentation's recipe, see DEFAULTS in train_seg.py):\n" + "\n".join(rows))


def crop_size(text):
    """--crop-size: 480 (a square) or HxW, e.g. 512x1024."""
    sizes = [int(v) for v in text.lower().split("x")]
    if len(sizes) > 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive size N or HxW")
    return sizes[0] if len(sizes) == 1 else sizes


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=recipe_table(), formatter_class=run.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="context", choices=sorted(DEFAULTS), help="dataset (context: built in, no download)")
    g.add_argument("--data-root", help="folder holding the dataset in its standard layout (real datasets)")
    g.add_argument("--split", default="train", help="training split, e.g. train, train+val, train_aug")
    g.add_argument("--crop-size", type=crop_size, help="training crop, N or HxW (paper: 480)")
    g.add_argument("--base-size", type=int, help="long side before random scaling 0.5–2 (paper: 520)")
    g.add_argument("--workers", type=int, help="data loader processes per training process")
    g.add_argument("--max-rotation", type=float, help="random rotation within ±degrees (released code: 10)")
    g.add_argument("--cat-max-ratio", type=float,
                   help="redraw a crop (up to 10 times) where one class covers more than this share (mmsegmentation)")
    g.add_argument("--photometric", action="store_true", default=None,
                   help="mmsegmentation's photometric distortion (brightness, contrast, saturation, hue)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="encnet", choices=["encnet", "fcn"], help="EncNet or the FCN baseline")
    g.add_argument("--backbone", choices=sorted(encnet.ARCHITECTURES), help="dilated ResNet (paper: resnet50)")
    g.add_argument("--pretrained", help="backbone weights: 'imagenet' (torchvision's), a path or a URL; "
                                        "'none' to train from scratch")
    g.add_argument("--width", type=int, help="backbone base width (64 = standard ResNet)")
    g.add_argument("--head-width", type=int, help="channels of the head (paper: 512)")
    g.add_argument("--num-codes", type=int, default=32, help="codewords K (0 = global average pooling)")
    g.add_argument("--no-se-loss", dest="se_loss", action="store_false", help="EncNet without the SE-losses")
    g.add_argument("--se-weight", type=float, default=0.2, help="α of the SE-loss (paper: 0.2)")
    g.add_argument("--aux", action="store_true", default=None, help="auxiliary FCN head on stage 3 (both zoos)")
    g.add_argument("--aux-weight", type=float, help="weight of the auxiliary loss (released code 0.2, mmsegmentation 0.4)")
    g.add_argument("--lateral", action="store_true", help="fuse stage 2–3 features into the head (released code)")
    g.add_argument("--residual-gate", action="store_true", default=None,
                   help="relu(x + x⊗γ) as in the released code, instead of the paper's x⊗γ")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout before the classifier")
    g.add_argument("--dropout2d", action="store_true", default=None, help="channel-wise dropout there (mmsegmentation)")
    g.add_argument("--no-stage3-encoding", dest="stage3_encoding", action="store_false", default=None,
                   help="EncNet without the stage-3 Context Encoding Module (Fig. 3) and its SE-loss (both zoos)")
    g.add_argument("--align-corners", action="store_true",
                   help="bilinear upsampling with align_corners=True (the released code)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch, split over processes (paper: 16)")
    g.add_argument("--epochs", type=int, help="paper: 120 ADE20K, 50 PASCAL")
    g.add_argument("--max-iters", type=int, help="total iterations (overrides --epochs)")
    g.add_argument("--lr", type=float,
                   help="base learning rate of the poly schedule (paper: 0.01 ADE20K, 0.001 others)")
    g.add_argument("--head-lr-mult", type=float, help="lr multiplier of the head (paper: 1, released code: 10)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    g.add_argument("--weight-decay", type=float, help="paper: 1e-4")
    g.add_argument("--min-lr", type=float, help="the poly schedule ends here (mmsegmentation: 1e-4)")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order, augmentation and dropout")
    g = run.add_run_arguments(p, out="runs/seg", log_every=5.0)
    g.add_argument("--init", help="fine-tune: start from the weights of a train_seg.py checkpoint, a published "
                                  "model's file or its name (see encnet.load_model), fresh optimizer and "
                                  "schedule; the model's architecture is the file's")
    g.add_argument("--val-every", type=int, default=0, help="quick validation every N epochs (0: only at the end)")
    args = p.parse_args(argv)
    length_in_epochs = args.epochs is not None  # then a recipe's iteration count does not apply
    for key, value in DEFAULTS[args.data].items():
        if key == "max_iters" and length_in_epochs:
            continue
        if getattr(args, key) is None:
            setattr(args, key, run.default_workers(value) if key == "workers" else value)
    if args.pretrained in ("none", ""):
        args.pretrained = None
    return args


def check_args(args):
    """Everything that can be checked before any work, each with one clear message."""
    if args.resume and args.init:
        run.fail("--resume and --init contradict each other: resume continues this run, init starts a new one")
    run.check_run_args(args)
    if args.data == "context" and (args.crop_size, args.base_size) != (data.CONTEXT_WIDTH, data.CONTEXT_WIDTH):
        run.fail(f"--crop-size {args.crop_size} --base-size {args.base_size}: the built-in images "
                 f"({data.CONTEXT_HEIGHT}×{data.CONTEXT_WIDTH}) are used whole, both must be {data.CONTEXT_WIDTH}")
    if args.data != "context" and not args.data_root:
        run.fail(f"--data {args.data} needs --data-root (the folder holding the dataset)")
    if args.data_root and not os.path.isdir(args.data_root):
        run.fail(f"--data-root {args.data_root} does not exist")


# ----------------------------------------------------------------------------- the recipe's pieces

def build_optimizer(model, args):
    """SGD; the head (everything but the backbone) optionally at head_lr_mult × lr (released code: 10×)."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone, "lr_mult": 1.0}, {"params": head, "lr_mult": args.head_lr_mult}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def poly_lr(optimizer, base_lr, it, total_iters, min_lr=0.0, power=0.9):
    """lr = (base − min) · (1 − iter/total)^0.9 + min, set every iteration (Sec. 3.1; min 0 in the paper)."""
    lr = (base_lr - min_lr) * (1 - it / total_iters) ** power + min_lr
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr


def starting_model(args, world, checkpoint, checkpoint_path):
    """The model with its first weights: the checkpoint's (--resume), another run's or a published
    model's (--init), or fresh with the backbone's pretrained weights (rank 0 fetches them first, so
    that the other processes find them in torch.hub's cache)."""
    if args.init:
        return init_model(args)
    model = encnet.model_from_args(vars(args))
    if checkpoint is not None:
        encnet.load_strict(model, checkpoint["model"], checkpoint_path)
    elif args.pretrained:
        is_main = int(os.environ.get("RANK", 0)) == 0
        if world > 1 and not is_main:
            dist.barrier()
        encnet.load_backbone_weights(model.backbone, args.pretrained, args.backbone)
        if world > 1 and is_main:
            dist.barrier()
    return model


# What --init leaves to the training command: which model to train and what to learn with it.
TRAINING_CHOICES = ("model", "se_loss", "stage3_encoding", "dropout")
# Modules that only training uses (their outputs are losses, not the segmentation): they may be
# missing from an --init file and start fresh. Neither zoo has the stage-3 Context Encoding Module.
TRAINING_ONLY = ("stage3_encoding.", "aux_head.", "enc_module.se_classifier.")


def init_model(args):
    """--init: a new run from the weights of another run (e.g. COCO → VOC) or of a published model.

    The architecture is the file's (backbone, head, gate, upsampling: args are updated, so that the
    run's checkpoint records it). Training-only modules the file lacks start fresh and are named in
    one line; every other weight must come from the file, and everything in the file must fit."""
    source, info = encnet.load_model(args.init)
    if info["num_classes"] != args.num_classes:
        raise ValueError(f"--init {args.init} predicts {info['num_classes']} classes ({info['dataset']}), "
                         f"--data {args.data} has {args.num_classes}: the classifier is kept, so they must match")
    for key in encnet.ARCHITECTURE:
        if key not in TRAINING_CHOICES:
            setattr(args, key, info["args"].get(key, encnet.ARCHITECTURE[key]))
    model = encnet.model_from_args(vars(args))
    state = source.state_dict()
    fresh = {k: v for k, v in model.state_dict().items() if k not in state and k.startswith(TRAINING_ONLY)}
    encnet.load_strict(model, {**state, **fresh}, args.init)
    if fresh and int(os.environ.get("RANK", 0)) == 0:
        modules = sorted({prefix.rstrip(".") for k in fresh for prefix in TRAINING_ONLY if k.startswith(prefix)})
        print(f"--init {args.init}: {len(fresh)} tensors not in the file start fresh: {', '.join(modules)}", flush=True)
    return model


def validation_images(model, dataset, device, args, count=4):
    """input | ground truth | prediction strips in class colours, for TensorBoard (3×H×(3W) uint8 each)."""
    palette = torch.tensor(dataset.palette, dtype=torch.uint8)
    strips = []
    for i in range(min(count, len(dataset))):
        image, label = dataset[i]
        probs = predict(model, data.normalize(image[None].to(device)), eval_crop(args), args.base_size, amp=args.amp)
        pred = predicted_classes(probs)[0].cpu()
        strips.append(torch.cat([image, colorize(label, palette), colorize(pred, palette)], 2))
    return strips


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
                logits = model(data.normalize(images.to(device)))
            metric.update(predicted_classes(logits).cpu(), labels)
    metric.all_reduce()
    model.train()
    return metric.pixacc_miou()


def eval_crop(args):
    """The window of whole-image evaluation: the training crop; after non-square crops (Cityscapes) the
    whole image at base size, as mmsegmentation evaluates it."""
    return args.crop_size if isinstance(args.crop_size, int) else args.base_size


def final_evaluation(model, dataset, rank, world, device, args, writer, it):
    """Whole images, single scale, sliding windows where larger than the crop → results.json,
    per_class_iou.txt, TensorBoard. → (pixAcc, mIoU)."""
    metric = evaluate(model, dataset, data.shard_indices(len(dataset), rank, world), device,
                      crop_size=eval_crop(args), base_size=args.base_size, amp=args.amp)
    metric.all_reduce()
    pix_acc, miou = metric.pixacc_miou()
    if rank == 0:
        writer.add_scalar("val/pixAcc", pix_acc, it)
        writer.add_scalar("val/mIoU", miou, it)
        for i, strip in enumerate(validation_images(model, dataset, device, args)):
            writer.add_image(f"val/input_truth_prediction/{i}", strip, it)
        table = per_class_table(metric, dataset.classes)
        with open(os.path.join(args.out, "per_class_iou.txt"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"pixAcc": pix_acc, "mIoU": miou}, f)
        print(table)
        print(f"final: pixAcc {pix_acc:.4f} mIoU {miou:.4f} ({args.model}, {args.data}, {it} iterations) "
              f"→ {args.out}/results.json", flush=True)
    return pix_acc, miou


# ----------------------------------------------------------------------------- training

def train(args):
    rank, world, device = run.setup_distributed()
    is_main = rank == 0
    torch.manual_seed(args.seed)  # the same initial weights on every process
    train_set = data.get_dataset(args.data, args.data_root, args.split, args.crop_size, args.base_size,
                                 seed=args.seed, max_rotation=args.max_rotation, cat_max_ratio=args.cat_max_ratio,
                                 photometric=args.photometric)
    val_quick = data.get_dataset(args.data, args.data_root, "val", args.crop_size, args.base_size, mode="center")
    val_full = data.get_dataset(args.data, args.data_root, "val", args.crop_size, args.base_size, mode="val")
    args.num_classes = train_set.num_classes
    # The validation split is read now, not after hours of training (each process its shard): every label
    # decoded, every image header opened. ADE20K's 2,000 images: ~7 s of CPU time.
    data.check_dataset(val_full, max(1, args.workers), data.shard_indices(len(val_full), rank, world))

    checkpoint_path = os.path.join(args.out, "checkpoint.pth")
    checkpoint = run.load_checkpoint(checkpoint_path) if args.resume else None
    if checkpoint is not None:
        run.check_same_run(checkpoint["args"], args, checkpoint_path, RUN_DEFINING)
    model = starting_model(args, world, checkpoint, checkpoint_path)
    model, net = run.distribute(model, world, device, args.channels_last, args.compile)
    optimizer = build_optimizer(model, args)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    plan = run.schedule(len(train_set), args.batch_size, args.epochs, args.max_iters, args.save_every)
    it = checkpoint["iter"] if checkpoint is not None else 0
    sampler = data.ShardedBatchSampler(len(train_set), args.batch_size, rank, world, seed=args.seed)
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.out)  # creates --out: only now that data and weights are in place
        print(f"{args.model} on {args.data} ({len(train_set)} train images, {args.num_classes} classes), "
              f"{world} process(es) on {device.type}, {plan.total_iters} iterations from {it}", flush=True)
    progress = run.Progress(args.log_every, plan.total_iters, it, args.batch_size, device)
    stats, stop = run.StepStats(world), run.StopRequest()

    def save_checkpoint(it):
        run.check_finite_weights(model, it, checkpoint_path)
        if is_main:
            run.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                                 "epoch": it // plan.iters_per_epoch, "args": run.plain_args(args),
                                 "classes": list(train_set.classes),
                                 "palette": [list(c) for c in train_set.palette]}, checkpoint_path)

    while it < plan.total_iters:
        epoch = it // plan.iters_per_epoch
        sampler.set_epoch(epoch, start_batch=it % plan.iters_per_epoch)  # mid-epoch resume skips seen batches
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda", worker_init_fn=run.loader_worker_signals)
        for images, labels in loader:
            # data
            run.seed_step(args.seed, it, rank)
            lr = poly_lr(optimizer, args.lr, it, plan.total_iters, args.min_lr)
            images = data.normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            # forward
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                outputs = net(images)
            # loss: per-pixel terms averaged over the *global* number of labelled pixels, so that N processes
            # compute exactly the single-process gradient (DDP averages over processes). The all-reduce is
            # queued on the device like any kernel; the host does not wait for it.
            num_pixels = run.all_reduce_mean((labels != -1).sum().float()[None], world)[0].clamp_min(1)
            loss, terms = encnet.seg_loss(outputs, labels, args.num_classes, args.se_weight, args.aux_weight,
                                          num_pixels)
            # backward
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # stays on the device
            # step (bf16 needs no loss scaling: no step is ever skipped)
            optimizer.step()
            stats.add(it, loss=loss, **terms, grad_norm=grad_norm, lr=lr)
            it += 1
            # log: the loop's only wait for the device, every run.SYNC_EVERY iterations and before a checkpoint
            stopping = False
            if it % run.SYNC_EVERY == 0 or plan.checkpoint_due(it):
                steps, stopping = stats.sync(bool(stop))
                run.log_steps(steps, writer, progress, epoch, it, checkpoint_path)
            # checkpoint
            if plan.checkpoint_due(it) or stopping:
                save_checkpoint(it)
            if stopping:
                raise run.Interrupted(stop.signum, it, checkpoint_path)
            if it == plan.total_iters:
                break
        epochs_done = it // plan.iters_per_epoch
        if args.val_every and it < plan.total_iters and it % plan.iters_per_epoch == 0 \
                and epochs_done % args.val_every == 0:
            pix_acc, miou = quick_validation(model, val_quick, rank, world, device, args)
            if is_main:
                print(f"epoch {epochs_done} | quick val pixAcc {pix_acc:.4f} mIoU {miou:.4f}", flush=True)
                writer.add_scalar("val/pixAcc", pix_acc, it)
                writer.add_scalar("val/mIoU", miou, it)
    stop.restore()

    result = final_evaluation(model, val_full, rank, world, device, args, writer, it)
    if is_main:
        writer.close()
    if world > 1:
        dist.destroy_process_group()
    return result


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    run.run_or_exit(train, args, user_errors=(data.DataError, encnet.DownloadError))


if __name__ == "__main__":
    main()
