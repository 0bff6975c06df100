"""Train FCN or EncNet for semantic segmentation with the paper's recipe (Sec. 3.1).

    python train_seg.py                                    # built-in context data, CPU, < 10 minutes
    python train_seg.py --model fcn                        # the FCN baseline on the same data
    torchrun --nproc_per_node 8 train_seg.py --data ade20k --data-root DATA    # ADE20K, 8 GPUs

One process per GPU (or CPU process under gloo), synchronized BatchNorm across all of them,
poly learning rate per iteration, checkpoints that resume to the same weights as an
uninterrupted run. Everything a run writes goes to --out: checkpoint.pth, TensorBoard logs,
results.json and the per-class IoU table.
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import data
import encnet
from eval import SegMetric, colorize, evaluate, per_class_table, predict
from syncbn import convert_sync_batchnorm

# Hyperparameters of the paper (Sec. 3.1) per dataset; flags override them. The context entry
# is sized so that `python train_seg.py` finishes in under 10 minutes on 2 CPU cores.
PAPER_RECIPE = dict(batch_size=16, crop_size=480, base_size=520, backbone="resnet50", pretrained="imagenet",
                    width=64, head_width=512, head_lr_mult=1.0, workers=8)
DEFAULTS = {
    "ade20k": dict(PAPER_RECIPE, lr=0.01, epochs=120),
    "pcontext": dict(PAPER_RECIPE, lr=0.001, epochs=50),
    "pascal_voc": dict(PAPER_RECIPE, lr=0.001, epochs=50),
    "pascal_aug": dict(PAPER_RECIPE, lr=0.001, epochs=50),
    # COCO pretraining for VOC (Sec. 3.3): base lr 0.01 per the paper; it does not give the epochs.
    "coco": dict(PAPER_RECIPE, lr=0.01, epochs=30),
    "context": dict(lr=0.02, epochs=13, batch_size=16, crop_size=320, base_size=320, head_lr_mult=10.0,
                    backbone="resnet18", pretrained=None, width=16, head_width=64, workers=0),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="context", choices=sorted(DEFAULTS),
                   help="dataset (default: context, built in, no download)")
    g.add_argument("--data-root", help="folder holding the dataset in its standard layout (real datasets)")
    g.add_argument("--split", default="train", help="training split, e.g. train, train+val, train_aug")
    g.add_argument("--crop-size", type=int, help="training crop (paper: 480)")
    g.add_argument("--base-size", type=int, help="long side before random scaling 0.5–2 (paper: 520)")
    g.add_argument("--workers", type=int, help="data loader processes per training process")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="encnet", choices=["encnet", "fcn"])
    g.add_argument("--backbone", choices=sorted(encnet.ARCHITECTURES), help="dilated ResNet (paper: resnet50)")
    g.add_argument("--pretrained", help="backbone weights: 'imagenet' (torchvision's), a path or a URL; "
                                        "'none' to train from scratch")
    g.add_argument("--width", type=int, help="backbone base width (64 = standard ResNet)")
    g.add_argument("--head-width", type=int, help="channels of the head (paper: 512)")
    g.add_argument("--num-codes", type=int, default=32, help="codewords K (0 = global average pooling)")
    g.add_argument("--no-se-loss", dest="se_loss", action="store_false", help="EncNet without the SE-losses")
    g.add_argument("--se-weight", type=float, default=0.2, help="α of the SE-loss (paper: 0.2)")
    g.add_argument("--aux", action="store_true", help="auxiliary FCN head on stage 3 (released code)")
    g.add_argument("--aux-weight", type=float, default=0.2, help="weight of the auxiliary loss")
    g.add_argument("--lateral", action="store_true", help="fuse stage 2–3 features into the head (released code)")
    g.add_argument("--residual-gate", action="store_true",
                   help="relu(x + x⊗γ) as in the released code, instead of the paper's x⊗γ")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout before the classifier")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch, split over processes (paper: 16)")
    g.add_argument("--epochs", type=int, help="paper: 120 ADE20K, 50 PASCAL")
    g.add_argument("--max-iters", type=int, help="total iterations (overrides --epochs)")
    g.add_argument("--lr", type=float,
                   help="base learning rate of the poly schedule (paper: 0.01 ADE20K, 0.001 others)")
    g.add_argument("--head-lr-mult", type=float, help="lr multiplier of the head (paper: 1, released code: 10)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order, augmentation and dropout")
    g = add_run_arguments(p, out="runs/seg", log_every=5.0)
    g.add_argument("--init", help="start from another run's checkpoint weights, fresh optimizer and schedule")
    g.add_argument("--val-every", type=int, default=0, help="quick validation every N epochs (0: only at the end)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pretrained in ("none", ""):
        args.pretrained = None
    return args


def add_run_arguments(parser, out, log_every):
    """The flags of a run that train_seg.py and train_cifar.py share. → the argument group."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=out, help="checkpoints, TensorBoard logs and results go here")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth")
    g.add_argument("--save-every", type=int, help="checkpoint every N iterations (default: once per epoch)")
    g.add_argument("--log-every", type=float, default=log_every, help="seconds between progress lines")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (GPU speed switch)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPU speed switch)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fail-at-iter", type=int, help=argparse.SUPPRESS)  # fault injection for the tests
    return g


# ----------------------------------------------------------------------------- process setup

def fail(message):
    """Stop before any work with one clear message (rank 0 prints it), no traceback."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on CPU. → (rank, world, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", store=worker_store(rank, world), rank=rank,
                                world_size=world, device_id=device if cuda else None)
    return rank, world, device


def worker_store(rank, world):
    """The key-value store through which the workers find each other, fresh for every restart.

    torchrun's agent keeps one store for the whole job, and with its default (static) rendezvous the keys of
    the workers it restarted are still there: a restarted worker can read the address of a dead peer from
    the previous attempt and fail with "Connection refused". A prefix per attempt keeps attempts apart."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True")
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def check_output_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"--out {path} is not writable ({e.strerror})")


def seed_step(seed, step, rank):
    """Seed torch's RNG (dropout, EncodingDrop) from (seed, step, rank): a resumed run draws the
    same numbers as an uninterrupted one without storing RNG states."""
    torch.manual_seed((seed * 1_000_003 + step) * 1009 + rank)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(state, path):
    """Atomic write: temp file, fsync, rename. A crash at any moment leaves the previous file intact."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain values only, never someone else's code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusal, or a damaged file
        raise ValueError(f"{path}: refused to load, it is not a plain checkpoint of tensors and values "
                         f"(loaded with weights_only=True): {str(e).splitlines()[0]}") from None


def plain_args(args):
    """The run's arguments as a dict of str/int/float/bool/None/list, safe under weights_only."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool, list))}


# Arguments that must agree between a checkpoint and the command that resumes it.
RUN_DEFINING = ("data", "split", "model", "backbone", "width", "head_width", "num_codes", "se_loss", "aux",
                "lateral", "residual_gate", "dropout", "batch_size", "epochs", "max_iters", "lr",
                "head_lr_mult", "momentum", "weight_decay", "crop_size", "base_size", "seed", "se_weight",
                "aux_weight")


def check_same_run(saved, args, path, keys=RUN_DEFINING):
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} in the checkpoint, {getattr(args, k)!r} now"
              for k in keys if saved.get(k) != getattr(args, k)]
    if differ:
        raise ValueError(f"--resume: {path} belongs to a different run:\n  " + "\n  ".join(differ))


# ----------------------------------------------------------------------------- training

class Progress:
    """A progress line every `every` seconds on rank 0: epoch, iteration, loss, lr, images/s, ETA."""

    def __init__(self, every, total_iters, start_iter, global_batch, device):
        self.every, self.total, self.global_batch, self.device = every, total_iters, global_batch, device
        self.t0 = self.last = time.time()
        self.start = start_iter

    def images_per_s(self, it):
        return (it - self.start) * self.global_batch / max(time.time() - self.t0, 1e-9)

    def maybe_print(self, epoch, it, terms, lr):
        now = time.time()
        if now - self.last < self.every and it != self.total:
            return
        self.last = now
        rate = (it - self.start) / (now - self.t0)
        eta = (self.total - it) / max(rate, 1e-9)
        loss = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        mem = (f" | mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
               if self.device.type == "cuda" else "")
        print(f"epoch {epoch} | iter {it}/{self.total} | {loss} | lr {lr:.2e} | "
              f"{self.images_per_s(it):.1f} img/s | eta {eta / 60:.1f} min{mem}", flush=True)


def build_optimizer(model, args):
    """SGD; the head (everything but the backbone) optionally at head_lr_mult × lr (released code: 10×)."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone, "lr_mult": 1.0}, {"params": head, "lr_mult": args.head_lr_mult}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def poly_lr(optimizer, base_lr, it, total_iters, power=0.9):
    """lr = base · (1 − iter/total)^0.9, set every iteration (Sec. 3.1)."""
    lr = base_lr * (1 - it / total_iters) ** power
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr


def all_reduce_mean(values, world):
    """Average a 1-D tensor over processes (a no-op for one process)."""
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values


def validation_images(model, dataset, device, args, count=4):
    """input | ground truth | prediction strips in class colours, for TensorBoard (3×H×(3W) uint8 each)."""
    palette = torch.tensor(dataset.palette, dtype=torch.uint8)
    strips = []
    for i in range(min(count, len(dataset))):
        image, label = dataset[i]
        probs = predict(model, data.normalize(image[None].to(device)), args.crop_size, args.base_size, amp=args.amp)
        strips.append(torch.cat([image, colorize(label, palette), colorize(probs.argmax(1)[0].cpu(), palette)], 2))
    return strips


def quick_validation(model, dataset, rank, world, device, args):
    """Fixed resize + centre crop, batched; confusion matrices summed over processes.
    (The unwrapped model: DDP's forward could wait on a collective when shards differ in length.)"""
    model.eval()
    metric = SegMetric(dataset.num_classes)
    loader = DataLoader(torch.utils.data.Subset(dataset, data.shard_indices(len(dataset), rank, world)),
                        batch_size=max(1, args.batch_size // world), num_workers=args.workers)
    with torch.no_grad():
        for images, labels in loader:
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = model(data.normalize(images.to(device)))
            metric.update(logits.argmax(1).cpu(), labels)
    metric.all_reduce()
    model.train()
    return metric.pixacc_miou()


def build_model(args, world, device, checkpoint, checkpoint_path):
    """The model with its starting weights, SyncBatchNorm when distributed, and its optimizer.
    → (model, net: what the training step calls (DDP and/or compiled), optimizer)."""
    # rank 0 fetches pretrained weights first, so that the others find them in torch.hub's cache
    is_main = int(os.environ.get("RANK", 0)) == 0
    if world > 1 and not is_main:
        dist.barrier()
    model = encnet.build_model(vars(args))
    if checkpoint is None and args.init is None and args.pretrained:
        encnet.load_backbone_weights(model.backbone, args.pretrained, args.backbone)
    if world > 1 and is_main:
        dist.barrier()
    if args.init:  # a new run from another run's weights (e.g. COCO → VOC), fresh optimizer and schedule
        encnet.load_strict(model, load_checkpoint(args.init)["model"], args.init)
    if checkpoint is not None:
        encnet.load_strict(model, checkpoint["model"], checkpoint_path)

    return distribute(model, build_optimizer, args, world, device, checkpoint)


def distribute(model, make_optimizer, args, world, device, checkpoint):
    """SyncBatchNorm when distributed, device and memory format, the optimizer (its state restored on
    resume), DDP and torch.compile. → (model, net: what the training step calls, optimizer)."""
    if world > 1:
        model = convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, args)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    return model, torch.compile(net) if args.compile else net, optimizer


def iteration_plan(num_images, args, checkpoint, rank, world):
    """A run over num_images training images in global batches of --batch-size. → (iterations per
    epoch, checkpoint interval, the iteration to start from, the sampler of this process's batches)."""
    iters_per_epoch = num_images // args.batch_size
    if iters_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {num_images} training images")
    start = checkpoint["iter"] if checkpoint is not None else 0
    sampler = data.ShardedBatchSampler(num_images, args.batch_size, rank, world, seed=args.seed)
    return iters_per_epoch, args.save_every or iters_per_epoch, start, sampler


def train(args):
    rank, world, device = setup_distributed()
    is_main = rank == 0
    torch.manual_seed(args.seed)  # the same initial weights on every process
    train_set = data.get_dataset(args.data, args.data_root, args.split, args.crop_size, args.base_size,
                                 seed=args.seed)
    val_quick = data.get_dataset(args.data, args.data_root, "val", args.crop_size, args.base_size, mode="center")
    val_full = data.get_dataset(args.data, args.data_root, "val", args.crop_size, args.base_size, mode="val")
    args.num_classes = train_set.num_classes

    checkpoint_path = os.path.join(args.out, "checkpoint.pth")
    checkpoint = load_checkpoint(checkpoint_path) if args.resume else None
    if checkpoint is not None:
        check_same_run(checkpoint["args"], args, checkpoint_path)
    model, net, optimizer = build_model(args, world, device, checkpoint, checkpoint_path)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    iters_per_epoch, save_every, it, sampler = iteration_plan(len(train_set), args, checkpoint, rank, world)
    total_iters = args.max_iters or args.epochs * iters_per_epoch
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.out)
        print(f"{args.model} on {args.data} ({len(train_set)} train images, {args.num_classes} classes), "
              f"{world} process(es) on {device.type}, {total_iters} iterations from {it}", flush=True)
    progress = Progress(args.log_every, total_iters, it, args.batch_size, device)

    def snapshot(it):
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # never replace a good checkpoint
            raise FloatingPointError(f"non-finite weights after iteration {it}; "
                                     f"the last good checkpoint {checkpoint_path} is untouched")
        if is_main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                             "epoch": it // iters_per_epoch, "args": plain_args(args),
                             "classes": list(train_set.classes), "palette": [list(c) for c in train_set.palette]},
                            checkpoint_path)

    while it < total_iters:
        epoch = it // iters_per_epoch
        sampler.set_epoch(epoch, start_batch=it % iters_per_epoch)  # mid-epoch resume skips seen batches
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        for images, labels in loader:
            if args.fail_at_iter == it and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and is_main:
                os.kill(os.getpid(), signal.SIGKILL)  # simulate a crashed worker (tests only)
            seed_step(args.seed, it, rank)
            lr = poly_lr(optimizer, args.lr, it, total_iters)
            images = data.normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            # Average per-pixel losses over the *global* number of labelled pixels, so that N
            # processes compute exactly the single-process gradient (DDP averages over processes).
            num_pixels = all_reduce_mean((labels != -1).sum().float()[None], world)[0].clamp_min(1)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                outputs = net(images)
            loss, terms = encnet.seg_loss(outputs, labels, args.num_classes, args.se_weight, args.aux_weight,
                                          num_pixels)
            # One small all-reduce gives every process the same loss terms: they log them and,
            # on divergence, all stop at the same iteration (no process left waiting).
            values = dict(zip(["loss", *terms], all_reduce_mean(torch.stack([loss.detach(), *terms.values()]),
                                                                world).tolist()))
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"non-finite loss at iteration {it} (epoch {epoch}): "
                                         + ", ".join(f"{k} {v}" for k, v in values.items())
                                         + f"; the last good checkpoint {checkpoint_path} is untouched")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
            if not math.isfinite(grad_norm):  # bf16 needs no loss scaling: a step is never skipped silently
                raise FloatingPointError(f"non-finite gradient at iteration {it} (loss {values['loss']}); "
                                         f"the last good checkpoint {checkpoint_path} is untouched")
            optimizer.step()
            it += 1

            if is_main:
                progress.maybe_print(epoch, it, values, lr)
                for k, v in {**values, "lr": lr, "grad_norm": grad_norm,
                             "images_per_s": progress.images_per_s(it)}.items():
                    writer.add_scalar(f"train/{k}", v, it)
            if it % save_every == 0 or it % iters_per_epoch == 0 or it == total_iters:
                snapshot(it)
            if it == total_iters:
                break
        epochs_done = it // iters_per_epoch
        if args.val_every and it < total_iters and it % iters_per_epoch == 0 and epochs_done % args.val_every == 0:
            pix_acc, miou = quick_validation(model, val_quick, rank, world, device, args)
            if is_main:
                print(f"epoch {epochs_done} | quick val pixAcc {pix_acc:.4f} mIoU {miou:.4f}", flush=True)
                writer.add_scalar("val/pixAcc", pix_acc, it)
                writer.add_scalar("val/mIoU", miou, it)

    # Final evaluation: whole images, single scale, sliding windows where larger than the crop.
    metric = evaluate(model, val_full, data.shard_indices(len(val_full), rank, world), device,
                      crop_size=args.crop_size, base_size=args.base_size, amp=args.amp)
    metric.all_reduce()
    pix_acc, miou = metric.pixacc_miou()
    if is_main:
        writer.add_scalar("val/pixAcc", pix_acc, it)
        writer.add_scalar("val/mIoU", miou, it)
        for i, strip in enumerate(validation_images(model, val_full, device, args)):
            writer.add_image(f"val/input_truth_prediction/{i}", strip, it)
        writer.close()
        table = per_class_table(metric, val_full.classes)
        with open(os.path.join(args.out, "per_class_iou.txt"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"pixAcc": pix_acc, "mIoU": miou}, f)
        print(table)
        print(f"final: pixAcc {pix_acc:.4f} mIoU {miou:.4f} ({args.model}, {args.data}, {it} iterations) "
              f"→ {args.out}/results.json", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return pix_acc, miou


def preflight(args):
    """Everything that can be checked before any work, each with one clear message."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.resume and args.init:
        fail("--resume and --init contradict each other: resume continues this run, init starts a new one")
    if args.data == "context" and (args.crop_size, args.base_size) != (data.CONTEXT_WIDTH, data.CONTEXT_WIDTH):
        fail(f"--crop-size {args.crop_size} --base-size {args.base_size}: the built-in images "
             f"({data.CONTEXT_HEIGHT}×{data.CONTEXT_WIDTH}) are used whole, both must be {data.CONTEXT_WIDTH}")
    if args.data != "context" and not args.data_root:
        fail(f"--data {args.data} needs --data-root (the folder holding the dataset)")
    if args.data_root and not os.path.isdir(args.data_root):
        fail(f"--data-root {args.data_root} does not exist")
    if args.init and not os.path.isfile(args.init):
        fail(f"--init {args.init}: no such checkpoint")
    if args.max_iters is not None and args.max_iters <= 0:
        fail("--max-iters must be positive")
    check_output_dir(args.out)
    resolve_resume(args)


def resolve_resume(args):
    """--resume needs a checkpoint; under torchrun --max-restarts a restarted job (restart count > 0)
    continues from its last checkpoint by itself, with no flag."""
    path = os.path.join(args.out, "checkpoint.pth")
    if args.resume and not os.path.isfile(path):
        fail(f"--resume: no checkpoint at {path}")
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and os.path.isfile(path) and not getattr(args, "init", None):
        args.resume = True


def run_or_exit(train_fn, args):
    """Run training; the failures a user can fix (bad data, a checkpoint that does not fit,
    divergence) end with their one-line message and exit status 1, not a traceback."""
    try:
        return train_fn(args)
    except (data.DataError, ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv=None):
    args = get_args(argv)
    preflight(args)
    run_or_exit(train, args)


if __name__ == "__main__":
    main()
