"""How the benchmarks measure: alternating timers, peak memory, the profile by category, the machine's name.

    timeit_alternating  the alternatives of one comparison timed in turns, so a busy machine slows them alike
    PeakMemory          the peak of PyTorch's own allocations during a call (any device, no allocator hooks)
    profile_table       one call under torch.profiler, its time by category (convolutions, BatchNorm/ReLU, …)
    device_peak         a GPU's name and bf16 peak, for the model FLOPs utilisation
    cpu_model           the processor's name: every figure is stated with it
"""
import platform
import time
import weakref

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode


def timeit(fn, repeat, warmup=2):
    """Median seconds of fn() over `repeat` runs."""
    return timeit_alternating({"fn": fn}, repeat, warmup)["fn"]


def timeit_alternating(fns, repeat, warmup=2):
    """Median seconds of each of {name: fn}, run in turns (a, b, a, b, …): an alternative compared in a
    ratio sees the same machine state, whatever the CPU's clock and caches do over the minutes."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors alive at once, counted op by op (CPU has no allocator statistics)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                self.seen.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key, size):
        self.seen.discard(key)
        self.live -= size


def peak_bytes(fn):
    with PeakMemory() as mode:
        fn()
    return mode.peak


# Dense bf16 tensor-core peak of the data sheets, TFLOP/s, for the model FLOPs utilisation (MFU) column.
# Matched against torch.cuda.get_device_name(), first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("A10G", 70))


def device_peak(device):
    """→ (is it a GPU, its name, its bf16 peak TFLOP/s from PEAK_BF16_TFLOPS or None)."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else str(device)
    return cuda, name, next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


# Profile categories, matched in this order against an op's name and then its callers' (lower case, no
# underscores): the first match from the op upwards decides, so a matmul inside the Encoding layer counts there.
PROFILE_CATEGORIES = (
    ("Encoding layer (fwd + bwd)", ("encodingfunction",)),
    ("optimizer and gradient norm", ("optimizer.", "foreachnorm")),
    ("logits at full resolution: ×8 upsampling and the losses", ("upsamplebilinear", "logsoftmax", "nllloss",
                                                                 "crossentropy", "binarycrossentropy")),
    ("convolutions", ("conv",)),
    ("BatchNorm and ReLU", ("batchnorm", "relu", "threshold")))


def profile_table(step, device, top=15):
    """One call of step() under torch.profiler → {'categories': {name: {'ms', 'pct'}}, 'top_ops': [[op, ms, pct]]},
    by device time on a GPU (the kernels each op launched itself), by CPU time on a CPU."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    own = {id(e): e.self_device_time_total if cuda else e.self_cpu_time_total for e in events}
    total = sum(own.values()) or 1
    categories = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    categories["other (residual adds, the gate, casts, copies, …)"] = 0.0
    for e in events:
        caller, found = e, None
        while caller is not None and found is None:
            key = caller.name.lower().replace("_", "")
            found = next((name for name, patterns in PROFILE_CATEGORIES if any(p in key for p in patterns)), None)
            caller = caller.cpu_parent
        categories[found or "other (residual adds, the gate, casts, copies, …)"] += own[id(e)]
    by_op = {}
    for e in events:
        by_op[e.name] = by_op.get(e.name, 0.0) + own[id(e)]
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"time": "device time of the kernels each op launched" if cuda else "CPU time of each op itself",
            "total_ms": total / 1e3,
            "categories": {k: {"ms": v / 1e3, "pct": 100 * v / total} for k, v in categories.items()},
            "top_ops": [[name, t / 1e3, 100 * t / total] for name, t in ops]}


def cpu_model():
    """The processor's name ('model name' of /proc/cpuinfo on Linux): every figure is stated with it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
