"""The plumbing of a training run under torchrun, shared by train_seg.py and train_cifar.py.

    add_run_arguments   the run flags (--out, --resume, --save-every, --log-every, --amp, ...)
    check_run_args      what can be checked before any work, each a one-line error (`fail`)
    continue_run        --resume: the run's settings from its checkpoint, explicit flags checked against them
    setup_distributed   process group (NCCL on GPUs, gloo on CPU) with a store fresh for every restart
    distribute          SyncBatchNorm, device, memory format, DDP and torch.compile around a model
    check_writable      an output folder, probed before any work: a one-line error saying why it cannot be written
    save_checkpoint     atomic write (zoo.read_checkpoint reads every checkpoint); a full disk is one line
    EventLog            TensorBoard's SummaryWriter whose write errors (in its thread too) end the run in one line
    Schedule, batches   iterations per epoch and in all; the batches of the run, epoch after epoch, from any iteration
    Bookkeeping         after every step: the host sync every 10 steps, logs, divergence, checkpoints, Ctrl-C/SIGTERM
    loader_worker_signals  the loader's workers leave Ctrl-C and a scheduler's SIGTERM to the training process
    run_or_exit         a errors.UserError ends with its one line; any other exception is a bug and keeps its traceback

Imports torch (and its TensorBoard writer), syncbn and errors only: nothing here knows about models.
"""
import argparse
import errno
import gc
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

import errors
from errors import Diverged, FlagError, UserError
from layers import seed_samples
from syncbn import convert_sync_batchnorm


# ----------------------------------------------------------------------------- flags

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and shows each flag's default (where it has one)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


def add_run_arguments(parser, out, log_every):
    """The flags of a run that train_seg.py and train_cifar.py share. → the argument group."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=out, help="checkpoints, TensorBoard logs and results go here")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth")
    g.add_argument("--save-every", type=int, help="checkpoint every N iterations (default: once per epoch)")
    g.add_argument("--log-every", type=float, default=log_every, help="seconds between progress lines")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast: a GPU speed switch (slow on CPUs without native bf16)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPU speed switch)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    return g


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(wanted):
    """Data loader processes per training process: `wanted`, capped at the cores this process may use
    (more only compete for them, and PyTorch warns about it)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(wanted, available_cores() // local_world))


def cpu_has_fast_bf16():
    """Native bf16 arithmetic (AVX512-BF16 or AMX); without it bf16 kernels are emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fail(message):
    """Stop before any work with one clear message, no traceback (see run_or_exit)."""
    raise FlagError(message)


def warn(message):
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{os.path.basename(sys.argv[0])}: warning: {message}", file=sys.stderr, flush=True)


def check_run_args(args):
    """The run flags, checked before any work: each problem is one line, and nothing is created."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    for flag in ("epochs", "max_iters", "save_every", "batch_size", "val_every"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0 and not (flag == "val_every" and value == 0):
            fail(f"--{flag.replace('_', '-')} {value}: must be positive")
    if args.workers is not None and args.workers < 0:
        fail(f"--workers {args.workers}: must be 0 (load in the training process) or more")
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    check_output_dir(args)
    if args.amp and not torch.cuda.is_available() and not cpu_has_fast_bf16():
        warn("--amp on a CPU without native bf16 (AVX512-BF16/AMX): bf16 is emulated there and "
             "runs many times slower than float32; leave --amp off on this machine")


def check_output_dir(args):
    """--out must be creatable and writable, and must not hold another run unless it is continued (--resume):
    a forgotten --resume would overwrite the checkpoint and mix TensorBoard logs. Nothing is created here
    (check_writable's probe file is removed at once); --out is made later, once the data and weights are in place."""
    path = args.out
    check_writable(path, f"--out {path}")
    if not args.resume and os.path.isdir(path):  # (a --resume without a checkpoint: `resuming` refuses it)
        found = sorted(f for f in os.listdir(path) if f in ("checkpoint.pth", "results.json")
                       or f.startswith("events.out.tfevents"))
        if found:
            shown = ", ".join(found[:3]) + (", …" if len(found) > 3 else "")
            fail(f"--out {path} already holds a run ({shown}); nothing was changed. Continue it with --resume "
                 f"(its settings come from its checkpoint), or start a new run with another --out")


def check_writable(folder, what):
    """Before any work: can files be written in `folder` (made later where missing)? A file is created and removed
    at once in it, or in the deepest folder on its way that exists; where that fails, `fail` (one line, exit
    status 2) says why: a file in the way, a read-only file system, no permission, no space. Permission bits alone
    would not tell (root ignores them; a read-only mount keeps them). Nothing else is created. what: the flag and
    its value as the message names them, e.g. '--out runs/x'."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        kind = "a broken link" if os.path.islink(existing) and not os.path.exists(existing) else "a file"
        fail(f"{what} is not writable ({existing} is {kind}, not a folder)")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as e:
        reason = {errno.EROFS: f"{existing} is on the read-only file system mounted at {errors.mount_point(existing)}",
                  errno.EACCES: f"no permission to write in {existing}",
                  errno.EPERM: f"no permission to write in {existing}",
                  errno.ENOSPC: f"no space left on the file system of {existing}",
                  errno.EDQUOT: f"disk quota exceeded on the file system of {existing}"}
        fail(f"{what} is not writable ({reason.get(e.errno, f'{existing}: {e.strerror}')})")


def resuming(args):
    """--resume, or a restart by torchrun --max-restarts (restart count > 0) that finds a checkpoint to continue
    from: a restarted job continues by itself, with no flag (sets args.resume)."""
    path = os.path.join(args.out, "checkpoint.pth")
    if args.resume and not os.path.isfile(path):
        fail(f"--resume: no checkpoint at {path}")
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and os.path.isfile(path) and not getattr(args, "init", None):
        args.resume = True
    return args.resume


def explicit_flags(parser, argv):
    """The dests of the options given on the command line `argv` (None: sys.argv), as opposed to defaults.
    The parser must be made with allow_abbrev=False, so that every option is spelt out."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    by_string = {s: a.dest for a in parser._actions for s in a.option_strings}
    return {by_string[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in by_string}


def continue_run(args, saved, explicit, defining, extendable=("epochs", "max_iters")):
    """--resume takes the run's settings from its checkpoint ('args' = `saved`): every setting not given on
    the command line is the saved one, so `--resume --out DIR` alone continues a run. A flag given explicitly
    must agree with the checkpoint where it defines the run (`defining`), except that the run may be made
    longer (`extendable`: the schedule then stretches to the new end, and the message says so); other flags
    (workers, logging, data location, speed switches) may change. → the notes to print (may be empty)."""
    differ, notes = [], []
    for key, value in saved.items():
        if key in ("out", "resume") or not hasattr(args, key):
            continue
        if key not in explicit:
            setattr(args, key, value)
        elif key in defining and getattr(args, key) != value:
            now = getattr(args, key)
            if key in extendable and value is not None and now is not None and now > value:
                notes.append(f"--{key.replace('_', '-')} {value} → {now}: the run is extended, and its schedule "
                             f"(learning rate) is stretched to the new end from here on")
            else:
                differ.append(f"--{key.replace('_', '-')} {value!r} in the checkpoint, {now!r} now")
    if differ:
        raise UserError(f"--resume: {os.path.join(args.out, 'checkpoint.pth')} belongs to a different run "
                        "(leave these flags out to continue it as it was):\n  " + "\n  ".join(differ))
    return notes


# ----------------------------------------------------------------------------- processes and devices

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


def end_distributed(world):
    """Destroy the process group at the end of a run, once what holds it is freed: the caller drops its DDP
    wrapper first, and a collection here frees the wrapper's reference cycles. A group that outlives this
    (freed only in the interpreter's teardown, or never) leaves gloo's threads running into the process's
    exit, where they can abort it ("terminate called without an active exception") after a complete run."""
    if world > 1:
        gc.collect()
        dist.destroy_process_group()


def worker_store(rank, world):
    """The key-value store through which the workers find each other, fresh for every restart.

    torchrun's agent keeps one store for the whole job, and with its default (static) rendezvous the keys of
    the workers it restarted are still there: a restarted worker can read the address of a dead peer from
    the previous attempt and fail with "Connection refused". A prefix per attempt keeps attempts apart."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True")
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def distribute(model, world, device, channels_last=False, compile=False):
    """Everything around a model that a multi-process, multi-device run needs, in this order:
    BatchNorm → SyncBatchNorm (more than one process), move to the device and memory format, DDP,
    torch.compile. → (model: the plain module, for state_dict and evaluation; net: what the training
    step calls)."""
    if world > 1:
        model = convert_sync_batchnorm(model)
    if device.type == "cuda":  # training crops have one size: cuDNN times its algorithms per layer once and keeps
        torch.backends.cudnn.benchmark = True  # the fastest (mmsegmentation's cudnn_benchmark=True; dilated convs)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    return model, torch.compile(net) if compile else net


def seed_step(seed, step, model, rank, batch):
    """Seed the step's random draws from (seed, step) alone, so that N processes draw what one process would and a
    resumed run what an uninterrupted one would, without storing RNG states: torch's RNG (EncodingDrop's factors,
    the same on every process) and each sample's dropout masks (layers.SampleDropout), from its index in the
    global batch (this process holds samples rank·batch … rank·batch + batch − 1: ShardedBatchSampler's slices)."""
    base = (seed * 1_000_003 + step) * 1009
    torch.manual_seed(base)
    seed_samples(model, [base * 65_537 + rank * batch + i for i in range(batch)])


def loader_worker_signals(worker_id):
    """DataLoader worker_init_fn. Ctrl-C reaches every process of the terminal's group, and a scheduler's
    SIGTERM (scancel, preemption) every process of the job: the loader's workers too. A worker that died of
    it would take the training process down with a traceback before its checkpoint, so workers leave both
    signals to the training process, which finishes the iteration, checkpoints and shuts them down.

    A SIGTERM from the training process itself (the loader stopping a stuck worker, the interpreter's
    exit) still ends the worker at once: SIGTERM is blocked and a thread reads who sent it (sigwaitinfo,
    Linux; elsewhere SIGTERM keeps its default)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
        threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _end_on_sigterm_from(parent):
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass  # someone else's: the training process got it too and will stop this worker
    # Exit 0, as a worker the loader shuts down: a death by signal of a worker still registered (an iterator
    # caught in an error's reference cycle, terminated at the interpreter's exit) is reported by the loader's
    # SIGCHLD handler as a crash, with a traceback.
    os._exit(0)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(state, path, intact=""):
    """Atomic write: temp file, fsync, rename. A crash at any moment leaves the previous file intact. A full disk
    (or another error of the file system) removes the temp file and raises errors.WriteError, one line naming the
    checkpoint, the cause and `intact` (what is intact and what to do: see Bookkeeping.intact)."""
    tmp = f"{path}.tmp"
    what = f"the checkpoint of iteration {state['iter']} ({path})" if "iter" in state else f"the checkpoint {path}"
    with errors.writing(path, what, intact, partial=tmp):
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


class EventLog:
    """TensorBoard's SummaryWriter (rank 0's) whose write errors end the run in one line (errors.WriteError: the
    cause, the events folder, and `intact`, what is intact and what to do, a function; Bookkeeping sets it).

    SummaryWriter writes in a thread of its own: an error there is kept and raised again by the next call (add_*,
    flush; close flushes first, so that the last records' error is not lost), where it becomes the WriteError;
    the thread's own traceback on stderr is silenced (install_quiet_event_thread). The events file is kept:
    TensorBoard reads the records before the failed one."""

    def __init__(self, out, intact=""):
        self.out, self.intact = out, intact
        install_quiet_event_thread()
        with self._writing():
            self.writer = SummaryWriter(out)

    def _writing(self):
        return self.writing(self.out, f"the TensorBoard events in {self.out}", partial=False)

    def writing(self, path, what, partial=None):
        """errors.writing for another output of the run (results.json, ...), saying what is intact as EventLog does."""
        return errors.writing(path, what, lambda: self.intact() if callable(self.intact) else self.intact, partial)

    def __getattr__(self, name):  # add_scalar, add_image, flush, ...: each call's errors as one line
        if name == "writer":  # not made (SummaryWriter failed)
            raise AttributeError(name)
        method = getattr(self.writer, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            with self._writing():
                return method(*args, **kwargs)
        return call

    def close(self):
        with self._writing():
            self.writer.flush()  # raises the thread's error, which close itself would drop
            self.writer.close()


def install_quiet_event_thread():
    """threading.excepthook, once per process: an error of the file system in TensorBoard's writer thread prints
    no traceback (EventLog raises it again, as one line, in the training thread); everything else as before."""
    previous = threading.excepthook
    if getattr(previous, "quiet_event_thread", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and errors.write_failure(args.exc_value) is not None:
            return
        previous(args)
    hook.quiet_event_thread = True
    threading.excepthook = hook


def plain_args(args):
    """The run's arguments as a dict of str/int/float/bool/None/list, safe under weights_only."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool, list))}


def check_finite_weights(model, it, checkpoint_path):
    """Never replace a good checkpoint with a diverged model."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise Diverged(f"non-finite weights after iteration {it}; "
                                 f"the last good checkpoint {checkpoint_path} is untouched")


# ----------------------------------------------------------------------------- the loop's bookkeeping

class Schedule(NamedTuple):
    """How long a run is, in iterations of one global batch (the last incomplete batch is dropped)."""
    iters_per_epoch: int
    total_iters: int
    save_every: int  # checkpoint interval (also at every epoch's end and at the last iteration)

    def checkpoint_due(self, it):
        return it % self.save_every == 0 or it % self.iters_per_epoch == 0 or it == self.total_iters

    def validation_due(self, it, every_epochs):
        """After iteration `it`: an epoch ended, it is the every_epochs-th (0: never), and training goes on."""
        return bool(every_epochs) and it < self.total_iters and it % self.iters_per_epoch == 0 \
            and (it // self.iters_per_epoch) % every_epochs == 0


def schedule(num_images, batch_size, epochs, max_iters=None, save_every=None):
    iters_per_epoch = num_images // batch_size
    if iters_per_epoch == 0:
        raise UserError(f"--batch-size {batch_size} is larger than the {num_images} training images")
    return Schedule(iters_per_epoch, max_iters or epochs * iters_per_epoch, save_every or iters_per_epoch)


def batches(dataset, sampler, plan, start_iter, workers, device):
    """(iteration, batch) of a run from iteration start_iter to its end, epoch after epoch.

    Each epoch's order and augmentation are functions of (seed, epoch, index) (`set_epoch`); a run resumed in
    the middle of an epoch skips the batches it has seen, so it sees exactly the batches of an uninterrupted one.
    The loader's workers leave Ctrl-C and SIGTERM to the training process (loader_worker_signals)."""
    it = start_iter
    while it < plan.total_iters:
        epoch = it // plan.iters_per_epoch
        sampler.set_epoch(epoch, start_batch=it % plan.iters_per_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                            worker_init_fn=loader_worker_signals)
        for batch in loader:
            yield it, batch
            it += 1
            if it == plan.total_iters:
                return


# How often the host reads the per-step numbers. Each read waits for the device to finish the
# queued steps; between reads a GPU runs ahead of Python. Checkpoints and the last step read too.
SYNC_EVERY = 10


class StepStats:
    """The per-step numbers of a run (loss terms, gradient norm, lr), kept on the device.

    `sync()` is the one place where the loop waits for the device: one all-reduce of all steps since
    the last sync (averaged over processes) plus the stop request, then one copy to the host. Every
    process gets the same numbers, so all of them detect a non-finite step, and a stop request, at
    the same iteration and leave together: none is left waiting in a collective.
    """

    def __init__(self, world):
        self.world = world
        self.names, self.pending = None, []  # pending: [(iteration, 1-D tensor, one value per name)]

    def add(self, it, **values):
        """it: the iteration (from 0) these values belong to; values: 0-d tensors or numbers."""
        self.names = self.names or list(values)
        device = next((v.device for v in values.values() if torch.is_tensor(v)), None)
        self.pending.append((it, torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach()
                                              for v in values.values()])))

    def sync(self, stop_requested=False):
        """→ ([(iteration, {name: value})] of the steps since the last sync, whether any process asked to stop)."""
        its = [it for it, _ in self.pending]
        flags = torch.tensor([float(stop_requested)])
        if self.pending:
            flags = flags.to(self.pending[0][1].device)
        flat = torch.cat([*(v for _, v in self.pending), flags])
        if self.world > 1:
            dist.all_reduce(flat)
        *values, stop = flat.tolist()  # host sync
        width = len(self.names or [])
        steps = [(it, {n: v / self.world for n, v in zip(self.names, values[i * width:(i + 1) * width])})
                 for i, it in enumerate(its)]
        self.pending = []
        return steps, stop > 0

    @staticmethod
    def check_finite(steps, checkpoint_path):
        """Stop at the first step whose loss or gradient was not finite, naming it and its loss terms."""
        for it, values in steps:
            if not all(math.isfinite(v) for v in values.values()):
                loss_finite = all(math.isfinite(v) for k, v in values.items() if k != "grad_norm")
                terms = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "lr")
                raise Diverged(f"non-finite {'gradient' if loss_finite else 'loss'} at iteration {it}: "
                                         f"{terms}; the last good checkpoint {checkpoint_path} is untouched")


class Bookkeeping:
    """What a trainer does after each optimizer step, the same for every trainer (a context manager).

    after_step(it, **values) records the step's numbers on the device; every SYNC_EVERY iterations, and before
    a checkpoint, it reads them (the loop's only wait for the device), stops on a non-finite step, writes
    TensorBoard and the progress line; it writes the checkpoint when one is due or a stop was requested --
    only after a sync and from finite weights, so a diverged model never replaces a good checkpoint -- and
    on Ctrl-C/SIGTERM (any process) raises Interrupted once the checkpoint is written.
    checkpoint(it) → the dict to save (rank 0 saves it); model: the weights checked for finiteness.
    """

    def __init__(self, plan, start_iter, world, writer, *, log_every, global_batch, device, checkpoint_path,
                 checkpoint, model):
        self.plan, self.writer, self.path, self.checkpoint, self.model = plan, writer, checkpoint_path, checkpoint, model
        self.saved = start_iter or None  # the iteration of the checkpoint on disk (a resumed run's, then each saved)
        if isinstance(writer, EventLog):
            writer.intact = self.intact  # a full disk under TensorBoard says what is intact too
        self.stats = StepStats(world)
        self.progress = Progress(log_every, plan.total_iters, start_iter, global_batch, device)

    def __enter__(self):
        self.stop = StopRequest()
        return self

    def __exit__(self, *exc):
        self.stop.restore()  # after training, Ctrl-C simply interrupts again

    def intact(self):
        """After a failed write (a full disk): what the run still has and how to go on, in words."""
        if self.saved is None:
            return (f"no checkpoint was written yet; free space, then start again (with another --out, or after "
                    f"deleting {os.path.dirname(self.path) or '.'})")
        return f"the checkpoint of iteration {self.saved} is intact; free space and continue with: {resume_command()}"

    def after_step(self, it, **values):
        """it: iterations completed; values: the step's numbers (0-d tensors or floats; 'lr' and 'grad_norm'
        are logged but not printed as loss terms)."""
        self.stats.add(it - 1, **values)
        due = self.plan.checkpoint_due(it)
        stopping = False
        if it % SYNC_EVERY == 0 or due:
            steps, stopping = self.stats.sync(bool(self.stop))
            StepStats.check_finite(steps, self.path)  # every process: they all stop together
            self.log(steps, it)
        if due or stopping:
            check_finite_weights(self.model, it, self.path)
            if self.writer is not None:  # rank 0
                save_checkpoint(self.checkpoint(it), self.path, self.intact)
                self.saved = it
        if stopping:
            raise Interrupted(self.stop.signum, it, self.path)

    def log(self, steps, it):
        """TensorBoard (every step) and the progress line (rank 0)."""
        if self.writer is None or not steps:
            return
        for step, values in steps:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step + 1)
        self.writer.add_scalar("train/images_per_s", self.progress.images_per_s(it), it)
        last = steps[-1][1]
        epoch = (it - 1) // self.plan.iters_per_epoch
        self.progress.maybe_print(epoch, it, {k: v for k, v in last.items() if k not in ("lr", "grad_norm")},
                                  last["lr"])


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
        rate = (it - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - it) / max(rate, 1e-9)
        loss = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        mem = (f" | mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
               if self.device.type == "cuda" else "")
        print(f"epoch {epoch} | iter {it}/{self.total} | {loss} | lr {lr:.2e} | "
              f"{self.images_per_s(it):.1f} img/s | eta {eta / 60:.1f} min{mem}", flush=True)


class Interrupted(Exception):
    """Raised by the loop once the checkpoint of a stop request is written. signum: the signal this
    process received (None: another process was interrupted, and this one stops with it)."""

    def __init__(self, signum, it, checkpoint_path):
        by = signal.Signals(signum).name if signum else "an interrupted peer process"
        super().__init__(f"stopped by {by} at iteration {it}; checkpoint saved to {checkpoint_path}. "
                         f"Continue with: {resume_command()}")
        self.exit_status = 128 + (signum or signal.SIGTERM)


def resume_command():
    """The command line that continues this run."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "the same torchrun command with --resume"
    argv = sys.argv if "--resume" in sys.argv else [*sys.argv, "--resume"]
    return " ".join(shlex.quote(a) for a in ["python", *argv])


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill) set a flag instead of killing.

    The loop reads the flag at its next sync (`StepStats.sync`, all processes agreeing), writes a
    checkpoint at that iteration and raises `Interrupted`. More signals change nothing: under torchrun a
    worker gets Ctrl-C from the terminal and again from the agent.
    """

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def __bool__(self):
        return self.signum is not None

    def restore(self):
        """Back to the default handlers (after training: Ctrl-C then simply interrupts)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def all_reduce_mean(values, world):
    """Average a 1-D tensor over processes (a no-op for one process)."""
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values


def one_line(error):
    """The message of an error; for one re-raised from a DataLoader worker ("Caught DataError in
    DataLoader worker process 0. Original Traceback …"), the original message alone."""
    message = str(error)
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


def run_or_exit(fn, *args):
    """fn(*args); a failure the user can fix (errors.UserError: bad data, flags or files, a download, a checkpoint
    that does not fit, divergence) or an interruption ends with its one-line message, not a traceback: exit
    status 1 (2 for flags), or 128 + the signal's number after Ctrl-C/SIGTERM. Any other exception is a bug
    and propagates with its traceback."""
    try:
        return fn(*args)
    except Interrupted as e:
        message, status, all_ranks = str(e), e.exit_status, False
    except KeyboardInterrupt:  # outside training's StopRequest (data checks, evaluation): nothing to save
        message, status, all_ranks = "interrupted", 128 + signal.SIGINT, False
    except UserError as e:
        message, status, all_ranks = f"error: {one_line(e)}", e.exit_status, e.all_ranks
    if all_ranks or int(os.environ.get("RANK", 0)) == 0:
        print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr, flush=True)
    sys.exit(status)
