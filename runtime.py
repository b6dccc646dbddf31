"""Where and how a process computes: process group, device, precision, and the FLOP/s ceiling.

Every script that runs a model builds one `Runtime`; it resolves "auto" into its own attributes and
leaves the caller's config as the user wrote it.
"""
import contextlib
import os
import time

import torch
import torch.distributed as dist

from configurator import UserError

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)  # what a dtype= key may say


def resolve_device(device):
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype, device_type):
    if dtype == "auto":
        if device_type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: use {', '.join(DTYPES)} or auto")
    return dtype


class Runtime:
    """Process group, device and precision of this process, from cfg's device and dtype."""

    def __init__(self, cfg):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        device = resolve_device(cfg["device"])
        if self.ddp:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
        self.master = self.rank == 0
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.dtype = resolve_dtype(cfg["dtype"], self.device_type)
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype))

    def all_sum(self, *values):
        """Sum over ranks of a few floats (one all-reduce); the values themselves without DDP."""
        if self.ddp:
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            values = t.tolist()
        return values[0] if len(values) == 1 else values

    def all_mean(self, *values):
        """Mean over ranks of a few floats (one all-reduce)."""
        sums = self.all_sum(*values)
        return sums / self.world if len(values) == 1 else [v / self.world for v in sums]

    def close(self):
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def measure_peak_flops(device, dtype=torch.float32, n=2048, repeats=5):
    """FLOP/s of a large square matmul on this device: the ceiling MFU is measured against.
    Its operands come from a private generator: the global RNG is left untouched."""
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if a.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
