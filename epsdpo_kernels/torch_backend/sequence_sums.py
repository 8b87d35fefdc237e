"""Token statistics summed per sequence, in plain torch (docs/SPEC.md, Per sequence).

Reads the ``(TOKEN_FIELDS, N)`` token stats and writes the ``(SEQUENCE_FIELDS, 2B)`` sequence
buffer (layout.py) for either layout of ``Sequences``. Padded rows are summed in place as a
``(2B, T)`` view; a packed stream's scored tokens are scattered into a ``(2B, longest)`` grid
(sequence by sequence, in stream order) and summed the same way, so no atomics are involved and
the result does not depend on the device.
"""

from __future__ import annotations

import torch

from .. import layout as L
from ..sequences import Sequences


def sequence_sums(
    stats: torch.Tensor, labels: torch.Tensor, sequences: Sequences, params
) -> torch.Tensor:
    count = sequences.count
    fields = list(L.SEQ_FROM_TOKEN)
    out = torch.empty((L.SEQUENCE_FIELDS, count), dtype=torch.float32, device=stats.device)
    if sequences.padded:
        tokens = sequences.longest
        # Summed as a view of all the fields, then picked: no copy of the token stats.
        out[: L.SEQ_COUNT] = stats.view(L.TOKEN_FIELDS, count, tokens).sum(-1)[fields]
        scored = (labels != params.ignore_index).view(count, tokens)
        out[L.SEQ_COUNT] = scored.sum(-1).to(torch.float32)
        return out
    order, offsets = sequences.order, sequences.offsets
    owner = sequences.keys[order]
    position = torch.arange(order.numel(), device=order.device) - offsets[owner]
    grid = stats.new_zeros((len(fields), count, sequences.longest))
    grid[:, owner, position] = stats[fields][:, order]
    out[: L.SEQ_COUNT] = grid.sum(-1)
    out[L.SEQ_COUNT] = offsets.diff().to(torch.float32)
    return out
