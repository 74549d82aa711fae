"""Peak bytes of the CPU allocator while a function runs: every allocation and free the c10
allocator reports to the torch profiler, in time order (allocator bytes, not RSS).

    peak = max_t sum_{events e at or before t} size_e      (a free is a negative size)

Used by the 8B memory bench and by tests that bound a function's working memory.
"""

from __future__ import annotations

import gc
import time

import numpy as np


def tracked_peak(fn) -> tuple[int, float]:
    """Peak bytes of the CPU allocator's tracked allocations while ``fn()`` runs (relative to
    its start, never below 0), and the seconds it took."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    seconds = time.perf_counter() - start
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
    live = np.cumsum([size for _, size in sorted(events)]) if events else np.zeros(1)
    return int(max(live.max(), 0)), seconds
