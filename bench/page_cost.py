"""Probe: what writing new bytes costs on this machine, fresh memory against memory just used.

Run by hand: ``python bench/page_cost.py [--mb 512]``.  On virtual machines whose
balloon device reports freed pages to the host, memory that was freed a few seconds
ago must be faulted in from the host again, so the first touch of "new" memory (and of
new page-cache pages when a file is written) costs far more than a copy into memory
in use.  Recording per-token traces writes hundreds of MB per minute, so this cost,
not neuroprobe's, sets the writer's share on such machines (see ``bench/RESULTS.md``).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--pause", type=float, default=10.0, help="seconds to wait after freeing before touching again")
    args = ap.parse_args()
    n = args.mb << 20
    src = np.ones(n, np.uint8)

    def touch() -> float:
        t = time.perf_counter()
        a = np.empty(n, np.uint8)
        a[:] = src
        dt = time.perf_counter() - t
        del a
        return n / dt / 1e9

    def write(d: str) -> float:
        path = os.path.join(d, "probe.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        t = time.perf_counter()
        for off in range(0, n, 8 << 20):
            os.pwrite(fd, memoryview(src)[off : off + (8 << 20)], off)
        dt = time.perf_counter() - t
        os.close(fd)
        os.unlink(path)
        return n / dt / 1e9

    balloon = [p for p in ("/sys/bus/virtio/drivers/virtio_balloon",) if os.path.exists(p)]
    print(f"virtio balloon driver present: {bool(balloon)}")
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as d:
        for label, fn in (("copy into new memory", touch), ("os.pwrite of a new file", lambda: write(d))):
            first, again = fn(), fn()
            time.sleep(args.pause)
            later = fn()
            print(f"{label:26s} {args.mb} MB: {first:5.2f} GB/s, at once again {again:5.2f} GB/s, "
                  f"after {args.pause:.0f} s {later:5.2f} GB/s")


if __name__ == "__main__":
    main()
