"""One decode attention shape of ``gpu_attention_sweep.py``, run eagerly a few times so Nsight
Compute (``/usr/local/cuda/bin/ncu`` on the GPU machine) can profile one launch of the decode
kernel: DRAM rate, issue-slot use, registers and occupancy, stall reasons.

    /usr/local/cuda/bin/ncu --kernel-name _decode_kernel --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section SchedulerStats \\
        --section WarpStateStats --section LaunchStats \\
        python3 bench/gpu_attention_ncu.py [SHAPE]

(with ``PYTHONPATH=src``). ``SHAPE``: a substring of a shape name of the sweep (default the
throughput workload's >= 192-row phase). Eager launches: no PDL (the graphs launch with it).
"""

from __future__ import annotations

import random
import sys

import torch

sys.path.insert(0, "bench")
only = sys.argv[1] if len(sys.argv) > 1 else "rows>=192"
sys.argv = sys.argv[:1]  # the sweep module reads its flags from argv

import gpu_attention_sweep as sweep  # noqa: E402

from modelhive.kernels.triton.paged_attention import paged_attention  # noqa: E402

name, rows, context, heads, kv_heads, dim, width = next(s for s in sweep.SHAPES if only in s[0])
q, caches, meta, kv_bytes = sweep.setup(rows, context, heads, kv_heads, dim, width,
                                        random.Random(0))
k_cache, v_cache = caches[0]
for _ in range(5):
    paged_attention(q, k_cache, v_cache, meta, dim ** -0.5)
torch.cuda.synchronize()
print(f"{name}: {rows} rows, ~{context} keys, {heads}/{kv_heads} heads x {dim}; "
      f"{kv_bytes / 1e6:.1f} MB of K/V a call")
