"""Where a cache mask's time goes: torch.profiler over the bench's compute-bound DiT, plain vs a mask.

    python scripts/profile_mask.py --device cuda --share 0.75     # on a GPU (CUDA kernels too)
    python scripts/profile_mask.py --device cpu --share 0.75      # here

Prints the per-call latency of both settings, the operators that take the most host time under the
mask, and the host↔device synchronisations per call (``aten::item``, ``aten::_local_scalar_dense``,
``cudaStreamSynchronize``): a synchronisation inside the step loop stalls a launch-bound GPU, which
is where realized speedups fall short of the FLOP-ideal ones.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--share", type=float, default=0.75, help="share of steps whose blocks are all reused")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import difftune
    from difftune.accel.cache import CacheMaskConfig, apply_cache_schedule
    from difftune.benchmarks import _compute_bound_dit, _skip_mask

    pipe, run = _compute_bound_dit(args.batch, args.device)
    info = difftune.describe(pipe)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(label: str) -> float:
        for _ in range(2):
            run()
        sync()
        started = time.perf_counter()
        for _ in range(5):
            run()
        sync()
        ms = (time.perf_counter() - started) * 200
        print(f"{label}: {ms:.1f} ms per call (wall, mean of 5)", flush=True)
        return ms

    plain_ms = timed("plain")
    mask = _skip_mask(info.mask_shape(8), args.share)
    handle = apply_cache_schedule(pipe, CacheMaskConfig.from_array(info.components, mask))
    masked_ms = timed(f"mask reusing every block at {int((~mask).all(axis=(1, 2)).sum())} of 8 steps")
    print(f"speedup {plain_ms / masked_ms:.2f}×", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])

    def profiled(label: str) -> None:
        with profile(activities=activities) as prof:
            run()
            sync()
        events = prof.key_averages()
        if label == "mask":
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
        counts = {
            name: sum(e.count for e in events if e.key == name)
            for name in ("aten::item", "cudaStreamSynchronize", "cudaMemcpyAsync")
        }
        counts["kernel launches"] = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        print(f"{label}, per call: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)

    profiled("mask")
    handle.remove()
    profiled("plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
