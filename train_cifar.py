"""CIFAR-10 with the Context Encoding Module on every block of a 14-layer ResNet (Sec. 3.5, Table 6).

    python train_cifar.py --model encnet16k64d --data-root DATA            # DATA/cifar-10-batches-py
    torchrun --nproc_per_node 2 train_cifar.py --model encnet32k128d --data-root DATA   # as the paper: 2 GPUs

Recipe of the paper: SGD momentum 0.9, weight decay 5e-4, batch 128, cosine learning rate over 600
epochs (base 0.1 as released), MSRA initialisation, 4-pixel pad + random crop + flip, EncodingDrop
in the EncNets. The same loop as train_seg.py (run.py's plumbing): torchrun/DDP with SyncBatchNorm, atomic checkpoints
and --resume, TensorBoard, a progress line; the final test top-1 accuracy goes to OUT/results.json.
"""
import argparse
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data
import encnet
import run
import transforms
import zoo

# Arguments that must agree between a checkpoint and the command that resumes it.
RUN_DEFINING = ("model", "epochs", "batch_size", "lr", "momentum", "weight_decay", "encoding_drop", "seed")


def get_args(argv=None):
    """The run's arguments: the command line, then --resume's checkpoint for what is not given; checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=run.HelpFormatter, allow_abbrev=False)
    p.add_argument("--model", default="encnet16k64d", choices=sorted(encnet.CIFAR_MODELS), help="a Table-6 network")
    p.add_argument("--data-root", help="folder holding cifar-10-batches-py (required for a new run)")
    p.add_argument("--epochs", type=int, default=600, help="paper: 600")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over processes (paper: 128)")
    p.add_argument("--lr", type=float, default=0.1, help="base lr of the cosine schedule (released code: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="paper: 5e-4 (released code: 1e-4)")
    p.add_argument("--encoding-drop", action=argparse.BooleanOptionalAction, default=True,
                   help="EncodingDrop: smoothing factors drawn from U(0, 1) in training, 0.5 in evaluation (Sec. 3.5); "
                        "--no-encoding-drop learns them")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order, augmentation and EncodingDrop")
    p.add_argument("--workers", type=int, default=run.default_workers(4),
                   help="data loader processes per training process (4, capped at the CPU cores)")
    g = run.add_run_arguments(p, out="runs/cifar", log_every=10.0)
    g.add_argument("--val-every", type=int, default=10, help="test error every N epochs (and at the end)")
    args = p.parse_args(argv)
    if run.resuming(args):
        saved = zoo.read_checkpoint(os.path.join(args.out, "checkpoint.pth"))["args"]
        for note in run.continue_run(args, saved, run.explicit_flags(p, argv), RUN_DEFINING):
            run.warn(note)
    check_args(args)
    return args


def check_args(args):
    run.check_run_args(args)
    if not args.data_root:
        run.fail("--data-root is required (the folder holding cifar-10-batches-py)")
    if not os.path.isdir(args.data_root):
        run.fail(f"--data-root {args.data_root} does not exist")


# ----------------------------------------------------------------------------- the recipe's pieces

def build_optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def cosine_lr(optimizer, base_lr, it, total_iters):
    """lr = base · ½(1 + cos(π·iter/total)), set every iteration."""
    lr = 0.5 * base_lr * (1 + math.cos(math.pi * it / total_iters))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def test_top1(model, dataset, rank, world, device, args):
    """Top-1 accuracy on the test set, sharded over processes and summed."""
    model.eval()
    subset = torch.utils.data.Subset(dataset, data.shard_indices(len(dataset), rank, world))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # [correct, seen]
    with torch.no_grad():
        for images, labels in DataLoader(subset, batch_size=256, num_workers=args.workers,
                                         worker_init_fn=run.loader_worker_signals):  # also runs inside training
            images = transforms.normalize(images.to(device), data.CIFAR_MEAN, data.CIFAR_STD)
            labels = labels.to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = model(images.contiguous(memory_format=memory_format))
            counts += torch.stack([(logits.argmax(1) == labels).sum(), labels.new_tensor(len(labels))])
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    return counts[0].item() / counts[1].item()


def final_evaluation(model, dataset, rank, world, device, args, writer, it):
    """Test top-1 → results.json and TensorBoard. → top-1 (fraction)."""
    top1 = test_top1(model, dataset, rank, world, device, args)
    if rank == 0:
        writer.add_scalar("test/error", 1 - top1, it)
        results_path = os.path.join(args.out, "results.json")
        with writer.writing(results_path, f"the final scores {results_path}"), open(results_path, "w") as f:
            json.dump({"top1": top1}, f)
        print(f"final: test top-1 {top1:.4f} ({args.model}, {it} iterations) → {args.out}/results.json", flush=True)
    return top1


# ----------------------------------------------------------------------------- training

def train(args):
    rank, world, device = run.setup_distributed()
    is_main = rank == 0
    train_set = data.get_dataset("cifar10", args.data_root, "train", seed=args.seed)
    test_set = data.get_dataset("cifar10", args.data_root, "test")

    checkpoint_path = os.path.join(args.out, "checkpoint.pth")
    checkpoint = zoo.read_checkpoint(checkpoint_path) if args.resume else None
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = encnet.build_cifar(args.model, args.encoding_drop)
    if checkpoint is not None:
        zoo.load_strict(model, checkpoint["model"], checkpoint_path)
    # SyncBatchNorm when distributed: the paper trained on 2 GPUs with synchronized BN
    model, net = run.distribute(model, world, device, args.channels_last, args.compile)
    optimizer = build_optimizer(model, args)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    plan = run.schedule(len(train_set), args.batch_size, args.epochs, save_every=args.save_every)
    start = checkpoint["iter"] if checkpoint is not None else 0
    sampler = data.ShardedBatchSampler(len(train_set), args.batch_size, rank, world, seed=args.seed)
    writer = None
    if is_main:
        writer = run.EventLog(args.out)
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.model} ({params / 1e6:.2f}M parameters) on CIFAR-10, {world} process(es) on {device.type}, "
              f"{plan.total_iters} iterations from {start}", flush=True)

    def checkpoint_state(it):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                "epoch": it // plan.iters_per_epoch, "args": run.plain_args(args)}

    with run.Bookkeeping(plan, start, world, writer, log_every=args.log_every, global_batch=args.batch_size,
                         device=device, checkpoint_path=checkpoint_path, checkpoint=checkpoint_state,
                         model=model) as book:
        for it, (images, labels) in run.batches(train_set, sampler, plan, start, args.workers, device):
            run.seed_step(args.seed, it, model, rank, len(labels))  # EncodingDrop: the same for any world size
            lr = cosine_lr(optimizer, args.lr, it, plan.total_iters)
            images = transforms.normalize(images.to(device, non_blocking=True), data.CIFAR_MEAN, data.CIFAR_STD)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = net(images.contiguous(memory_format=memory_format))
            # every process holds the same number of images: its mean, averaged by DDP, is the global mean
            loss = F.cross_entropy(logits.float(), labels)
            error = (logits.argmax(1) != labels).float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the norm only
            optimizer.step()
            book.after_step(it + 1, loss=loss, error=error, grad_norm=grad_norm, lr=lr)
            if plan.validation_due(it + 1, args.val_every):
                top1 = test_top1(model, test_set, rank, world, device, args)
                if is_main:
                    print(f"epoch {(it + 1) // plan.iters_per_epoch} | test top-1 {top1:.4f} "
                          f"(error {100 * (1 - top1):.2f}%)", flush=True)
                    writer.add_scalar("test/error", 1 - top1, it + 1)

    result = final_evaluation(model, test_set, rank, world, device, args, writer, plan.total_iters)
    if is_main:
        writer.close()
    del net  # DDP's reducer holds the process group, which must not outlive the run (run.end_distributed)
    run.end_distributed(world)
    return result


def main(argv=None):
    run.run_or_exit(lambda: train(get_args(argv)))


if __name__ == "__main__":
    main()
