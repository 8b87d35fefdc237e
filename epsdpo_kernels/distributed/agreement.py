"""The one check both parallel layouts make before any kernel runs: do the group's ranks agree?

A loss call whose ranks disagree (different sequences, options or, for vocabulary parallelism,
different tokens) would otherwise hang in a collective or return wrong sums without a word.
"""

from __future__ import annotations

import torch


def check_ranks_agree(group, device: torch.device, values: dict, argument: str, why: str) -> None:
    """One MAX all-reduce of 2·len(values) float64s (max(v) and −min(v) together): raise a
    ValueError naming ``argument`` on every rank alike when any value differs over ``group``.
    A value is a number or a 0-dim tensor on ``device``; reading the result back is the check's
    one host synchronisation (numbers become device fills, not blocking host-to-device copies,
    and a tensor is not read before the all-reduce)."""
    import torch.distributed as dist

    mine = torch.stack(
        [
            v.to(torch.float64).reshape(())
            if isinstance(v, torch.Tensor)
            else torch.full((), float(v), dtype=torch.float64, device=device)
            for v in values.values()
        ]
    )
    extremes = torch.cat([mine, -mine])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    both = extremes.tolist()  # one read-back: the check's one host synchronisation
    high, low = both[: mine.numel()], [-v for v in both[mine.numel() :]]
    differ = [
        f"{name} from {lo:g} to {hi:g}" for name, lo, hi in zip(values, low, high) if lo != hi
    ]
    if differ:
        raise ValueError(f"{argument}: {why}; over the group they range: " + "; ".join(differ))
