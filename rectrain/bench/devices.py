"""Device and process helpers of the train-step benchmarks: moving a batch dict to a device,
synchronising, bf16 autocast, a free loopback port, embedding-shard bytes and current RSS."""

from __future__ import annotations

import os
import resource
import socket

import torch


def to_device(x, dev):
    if dev.type == "cpu":
        return x
    return {k: (tuple(t.to(dev) for t in v) if isinstance(v, tuple) else v.to(dev))
            for k, v in x.items()}


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast(dev, bf16: bool):
    """bf16 autocast of the dense layers on GPU (embeddings stay fp32); a no-op otherwise."""
    import contextlib

    if bf16 and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedding_bytes(dmp) -> int:
    """Bytes of this rank's embedding shards (weights) plus fused optimiser state tensors."""
    total = 0
    for _, t in dmp.state_dict().items():
        if hasattr(t, "local_shards"):
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
    try:
        for _, st in dmp.fused_optimizer.state.items():
            for v in (st.values() if isinstance(st, dict) else []):
                if hasattr(v, "local_shards"):
                    total += sum(s.tensor.numel() * s.tensor.element_size()
                                 for s in v.local_shards())
                elif torch.is_tensor(v):
                    total += v.numel() * v.element_size()
    except Exception:  # noqa: BLE001 - optimiser state layout differs across versions
        pass
    return total


def rss_mb() -> float:
    """This process's resident memory now, MB (``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
