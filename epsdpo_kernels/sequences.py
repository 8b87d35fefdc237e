"""Which sequence each token row belongs to: the map from tokens to the 2B sequences.

Two layouts reach the loss and both become one ``Sequences`` map, so every later step (the
token-to-sequence sums, the per-token gradient coefficient) has one code path:

- padded rows ``(2B, T)``: sequence n is row n, its tokens are rows ``n·T … n·T + T − 1`` of the
  flattened stream, ignored tokens included (their statistics are zeros). No index tensor is
  built: the sums walk each row in place.
- a packed stream of N tokens with ``sequence_ids``: sequence j is every scored token whose id
  is j, in stream order, wherever it sits. ``order`` lists the scored tokens sorted by sequence
  (a stable sort, so each sequence keeps its stream order) and ``offsets[j] … offsets[j+1]`` is
  sequence j's run in it. Ignored tokens carry the key 2B (sorted last, cut off), so their ids
  are never read.

In both, sequence ``j < B`` is the chosen response of pair j and ``j ≥ B`` the rejected response
of pair ``j − B``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sequences:
    """The token-to-sequence map of one loss call (see the module docstring)."""

    count: int  # 2B
    tokens: int  # N, token rows in the flattened stream
    longest: int  # an upper bound on the tokens of one sequence's run (T when padded)
    # Packed layout only (None when padded):
    keys: torch.Tensor | None = None  # (N,) int64: the token's sequence, 2B if it is ignored
    order: torch.Tensor | None = None  # (S,) int64 scored token rows, sorted by sequence
    offsets: torch.Tensor | None = None  # (2B + 1,) int64 start of each sequence's run

    @property
    def padded(self) -> bool:
        return self.keys is None

    def token_coefficients(self, sequence_coef: torch.Tensor) -> torch.Tensor:
        """(N,) fp32: each token's sequence's gradient coefficient c_n (0 for ignored tokens of
        a packed stream; the backward does not read ignored rows' coefficients)."""
        coef = sequence_coef.float()
        if self.padded:
            return coef.repeat_interleave(self.tokens // self.count)
        return torch.cat([coef, coef.new_zeros(1)])[self.keys]


def scored_rows(labels: torch.Tensor, ignore_index: int, scored_count: int) -> torch.Tensor:
    """Flat indices of the scored token rows in order, without a host sync: a stable sort puts
    them first, and their count is already known (from the call's one label scan)."""
    unscored = (labels == ignore_index).flatten().to(torch.uint8)
    return torch.argsort(unscored, stable=True)[:scored_count]


def spread_scored(values: torch.Tensor, labels: torch.Tensor, ignore_index: int, dim: int):
    """``values`` of the S scored token rows along ``dim`` (in ``scored_rows`` order) → the
    same over all N token rows, zeros at the ignored ones. A gather through each row's place
    in the scored list (a running count of scored rows), not a scatter: under
    ``torch.use_deterministic_algorithms`` a CUDA scatter sorts its indices and reads sizes back
    to the host; a gather does neither."""
    scored = (labels != ignore_index).flatten()
    place = torch.where(scored, torch.cumsum(scored, 0) - 1, values.shape[dim])
    zeros = values.new_zeros(
        values.shape[: dim % values.dim()] + (1,) + values.shape[dim % values.dim() + 1 :]
    )
    return torch.cat([values, zeros], dim).index_select(dim, place)


def padded_sequences(labels: torch.Tensor) -> Sequences:
    """The map of ``(2B, T)`` padded rows."""
    rows, tokens = labels.shape
    return Sequences(count=rows, tokens=rows * tokens, longest=tokens)


def sequence_keys(
    sequence_ids: torch.Tensor, scored: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, bad): each token's sequence, ``count`` for an ignored token; and a mask of the
    scored tokens whose id is out of [0, count), which the caller reports (keyed ``count``
    here, so that nothing downstream indexes out of bounds before the check has run)."""
    ids = sequence_ids.reshape(-1).long()
    scored = scored.reshape(-1)
    bad = scored & ((ids < 0) | (ids >= count))
    keys = torch.where(scored & ~bad, ids, count)
    return keys, bad


def run_lengths(keys: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) scored tokens per sequence, from ``sequence_keys`` (on the device, no sync)."""
    runs = torch.zeros(count + 1, dtype=torch.int64, device=keys.device)
    runs.scatter_add_(0, keys, torch.ones_like(keys))
    return runs[:count]


def places(keys: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """(N,) each token's 1-based place among the tokens of its ``sequence_keys`` key, in stream
    order, from the keys' ``run_lengths`` (on the device, no sync). Unscored tokens (key 2B)
    come after every run."""
    starts = torch.cumsum(runs, 0) - runs
    starts = torch.cat([starts, runs.sum().reshape(1)])
    order = torch.argsort(keys, stable=True)
    place = torch.empty_like(keys)
    place[order] = torch.arange(1, keys.numel() + 1, device=keys.device) - starts[keys[order]]
    return place


def packed_sequences(
    keys: torch.Tensor, runs: torch.Tensor, scored_count: int, longest: int
) -> Sequences:
    """The map of a packed stream from its ``sequence_keys`` and ``run_lengths``;
    ``scored_count`` and ``longest`` (the longest run) come from the call's one host
    synchronisation."""
    count = runs.numel()
    offsets = torch.zeros(count + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(runs, 0, out=offsets[1:])
    return Sequences(
        count=count,
        tokens=keys.numel(),
        longest=max(1, longest),
        keys=keys,
        order=torch.argsort(keys, stable=True)[:scored_count],
        offsets=offsets,
    )
