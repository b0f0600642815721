"""Real reads of neuron chunks from a weight file on this machine's disk, to check the storage model.

The check (CLI ``dormant storage-check``, run by :func:`dormant.experiments.offload.storage_check`):

1. writes a weight file laid out as the simulator assumes (:class:`~dormant.offload.layout.ItemLayout`,
   bundled, random bytes -- contents do not matter, holes would, so the file is really written);
2. *fits* this machine's profile from three microbenchmarks that are not the check itself --
   sequential 4 MiB reads at depth 1 (``B``), 4 KiB random reads at depth 1 and at the deepest tested
   queue (IOPS), plus a DRAM copy and a matrix-vector product for the non-storage numbers;
3. *replays* the demand loads of real trace batches (one layer of one token = one batch of coalesced,
   4 KiB-aligned requests) at several chunk sizes and queue depths, timing each batch, and compares the
   measured time with ``T(n, S)`` of :class:`~dormant.offload.profiles.StorageModel` under the fitted
   profile.

The page cache is bypassed with ``O_DIRECT`` (aligned ``mmap`` buffers, aligned offsets and sizes)
where the OS and file system allow it; otherwise the file's cached pages are dropped with
``posix_fadvise(POSIX_FADV_DONTNEED)`` before every batch; the mode used is recorded. ``q`` reads are
kept in flight by ``q`` threads calling ``os.preadv`` (which releases the GIL), so Python's per-request
overhead is part of both the fit and the check. In a virtual machine the host may still cache the file.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dormant.offload.layout import ItemLayout
from dormant.offload.profiles import DeviceProfile, Figure

__all__ = ["ALIGN", "DirectReader", "write_weight_file", "fit_profile", "replay"]

ALIGN = 4096


class DirectReader:
    """Reads ``(offset, size)`` requests from ``path`` with the page cache bypassed where possible.

    Attributes:
        mode: ``"O_DIRECT"`` or ``"posix_fadvise(DONTNEED)"``.
    """

    def __init__(self, path: str | Path, max_request: int, queue_depth: int = 1):
        self.path = str(path)
        self.max_request = -(-max_request // ALIGN) * ALIGN
        self.queue_depth = queue_depth
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            self.mode = "O_DIRECT" if hasattr(os, "O_DIRECT") else "posix_fadvise(DONTNEED)"
            buf = mmap.mmap(-1, ALIGN)
            os.preadv(self.fd, [memoryview(buf)[:ALIGN]], 0)  # O_DIRECT may open but refuse reads
        except OSError:
            self.fd = os.open(self.path, os.O_RDONLY)
            self.mode = "posix_fadvise(DONTNEED)"
        self._local = threading.local()
        self._pool = None
        if queue_depth > 1:
            self._pool = ThreadPoolExecutor(queue_depth)
            # start every thread and fault in its buffer before anything is timed
            barrier = threading.Barrier(queue_depth)
            list(self._pool.map(lambda _: (barrier.wait(), self._read((0, ALIGN))), range(queue_depth)))
        else:
            self._read((0, ALIGN))

    def _buffer(self) -> memoryview:
        mv = getattr(self._local, "buf", None)
        if mv is None:
            self._local.mm = mmap.mmap(-1, self.max_request)  # page-aligned, as O_DIRECT needs
            mv = self._local.buf = memoryview(self._local.mm)
        return mv

    def _read(self, req: tuple[int, int]) -> int:
        off, size = req
        return os.preadv(self.fd, [self._buffer()[:size]], off)

    def drop_cache(self) -> None:
        if self.mode != "O_DIRECT" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_batch(self, requests: list[tuple[int, int]]) -> float:
        """Issue all requests (``queue_depth`` in flight), wait for all; return the wall time in seconds."""
        self.drop_cache()
        t0 = time.perf_counter()
        if self._pool is None:
            for r in requests:
                self._read(r)
        else:
            list(self._pool.map(self._read, requests))
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        os.close(self.fd)


def write_weight_file(path: Path, size: int, block: int = 8 << 20) -> None:
    """Write ``size`` random bytes (really written: holes would read back without touching the disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
        f.flush()
        os.fsync(f.fileno())


def _measure_dram_and_compute() -> tuple[float, float]:
    """(DRAM copy bandwidth in GB/s, fp32 matvec GFLOP/s) on one thread, a few hundred ms each."""
    import torch

    a = np.ones(32 << 20, dtype=np.uint8)  # 32 MiB, well beyond caches
    b = np.empty_like(a)
    t0 = time.perf_counter()
    for _ in range(8):
        np.copyto(b, a)
    bw = 8 * 2 * a.nbytes / (time.perf_counter() - t0) / 1e9  # read + write
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = torch.randn(1536, 576)
        x = torch.randn(576)
        t0 = time.perf_counter()
        for _ in range(200):
            w @ x
        fl = 200 * 2 * w.numel() / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(threads)
    return bw, fl


def fit_profile(path: str | Path, file_size: int, max_qd: int, n_reads: int = 1500,
                seed: int = 0) -> tuple[DeviceProfile, dict[str, Any]]:
    """This machine's profile from microbenchmarks on ``path`` (see the module docstring).

    Returns:
        ``(profile, raw measurements)``.
    """
    rng = np.random.default_rng(seed + 1)
    when = time.strftime("%Y-%m-%d %H:%M")
    big = 4 << 20
    seq = [(o, big) for o in range(0, max(file_size - big, 1), big)][: max(16, (256 << 20) // big)]
    r = DirectReader(path, big, 1)
    t_seq = r.read_batch(seq)
    mode = r.mode
    n_pages = file_size // ALIGN
    offs = [(int(p) * ALIGN, ALIGN) for p in rng.integers(0, n_pages, n_reads)]
    t_qd1 = r.read_batch(offs)
    r.close()
    r = DirectReader(path, ALIGN, max_qd)
    offs = [(int(p) * ALIGN, ALIGN) for p in rng.integers(0, n_pages, 2 * n_reads)]
    t_qd = r.read_batch(offs)
    r.close()
    bw_seq = len(seq) * big / t_seq
    iops1 = n_reads / t_qd1
    iops_q = 2 * n_reads / t_qd
    # keep the fit consistent with the model's constraints (L > 0, X_max >= QD1 IOPS)
    iops1 = min(iops1, 0.999 / (ALIGN / bw_seq))
    iops_q = max(iops_q, iops1)
    dram, flops = _measure_dram_and_compute()
    src = f"measured by dormant storage-check on {when} ({mode}, file {path})"
    figures = {
        "storage.seq_read_MBps": Figure(bw_seq / 1e6, f"{src}: {len(seq)} sequential 4 MiB reads, depth 1"),
        "storage.rand_read_4k_qd1_iops": Figure(iops1, f"{src}: {n_reads} random 4 KiB reads, depth 1"),
        "storage.rand_read_4k_max_iops": Figure(iops_q, f"{src}: {2 * n_reads} random 4 KiB reads, depth {max_qd}"),
        "storage.max_queue_depth": Figure(float(max_qd), "deepest queue tested by storage-check"),
        "dram.capacity_GB": Figure(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                                   "os.sysconf physical pages"),
        "dram.bandwidth_GBps": Figure(dram, f"{src}: numpy copy of 32 MiB, one thread (read + write)"),
        "compute.GFLOPs": Figure(flops, f"{src}: torch fp32 1536x576 matvec, one thread"),
    }
    prof = DeviceProfile("this-machine", f"this machine, fitted {when}", figures,
                         {"storage.device": f"file {path}"})
    raw = {"mode": mode, "seq_bytes_per_s": bw_seq, "iops_qd1": n_reads / t_qd1, "iops_qd": 2 * n_reads / t_qd,
           "qd": max_qd}
    return prof, raw


def replay(reader: DirectReader, items: ItemLayout, batches: list[tuple[int, np.ndarray]],
           profile: DeviceProfile) -> dict[str, Any]:
    """Time the demand loads of ``batches`` (``(layer, neuron mask [I])``) and compare with the model."""
    sm = profile.storage
    meas, pred, nreq, nbytes = [], [], [], []
    for layer, neuron_mask in batches:
        reqs = items.request_list(layer, items.items(neuron_mask))
        if not reqs:
            continue
        meas.append(reader.read_batch(reqs))
        nreq.append(len(reqs))
        nbytes.append(sum(s for _, s in reqs))
        pred.append(sm.batch_time(len(reqs), nbytes[-1], reader.queue_depth))
    m, p = np.array(meas), np.array(pred)
    return {
        "chunk": items.layout.chunk,
        "queue_depth": reader.queue_depth,
        "batches": len(m),
        "requests_per_batch": float(np.mean(nreq)),
        "bytes_per_batch": float(np.mean(nbytes)),
        "measured_s": float(m.sum()),
        "predicted_s": float(p.sum()),
        "ratio_total": float(m.sum() / p.sum()),
        "ratio_median": float(np.median(m / p)),
        "ratio_p10": float(np.quantile(m / p, 0.1)),
        "ratio_p90": float(np.quantile(m / p, 0.9)),
        "log_corr": float(np.corrcoef(np.log(m), np.log(p))[0, 1]) if len(m) > 2 and np.std(np.log(p)) > 0
        else None,
        "measured_per_batch": m.tolist(),
        "predicted_per_batch": p.tolist(),
    }
