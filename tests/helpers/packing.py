"""Packed (padding-free) versions of padded test batches, and the way back for gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    """A packed stream holding every token of a ``(2B, T)`` padded batch, plus filler tokens.

    ``source[k]`` is the flat padded position of stream token k, or −1 for a filler (an
    unscored token with an arbitrary sequence id, even an out-of-range one, and NaN inputs, so
    that reading one would show)."""

    source: torch.Tensor  # (N,) int64
    sequence_ids: torch.Tensor  # (N,) int64
    num_pairs: int

    def stream(self, x: torch.Tensor, fill=float("nan")) -> torch.Tensor:
        """``(2B, T, …)`` → ``(N, …)``; fillers get ``fill``."""
        flat = x.reshape(-1, *x.shape[2:])
        filler = torch.full_like(flat[:1], fill)
        return torch.cat([flat, filler])[self.source.to(x.device)]

    def labels(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        return self.stream(labels, fill=ignore_index)

    def unstream(self, grad: torch.Tensor, padded_shape) -> torch.Tensor:
        """A stream gradient ``(N, …)`` back in the padded layout; fillers must have none."""
        source = self.source.to(grad.device)
        filler = source < 0
        assert (grad[filler] == 0).all(), "a filler token (unscored) got a gradient"
        out = grad.new_zeros((padded_shape[0] * padded_shape[1], *grad.shape[1:]))
        out[source[~filler]] = grad[~filler]
        return out.view(*padded_shape[:2], *grad.shape[1:])


def pack(labels: torch.Tensor, *, seed: int, mode: str = "sequences", fillers: int = 0) -> Packing:
    """Pack the rows of ``labels`` (2B, T): ``mode="sequences"`` shuffles whole sequences (each
    contiguous, in its own order); ``"tokens"`` shuffles every token (sequences interleaved and
    out of order: the sums do not care). ``fillers`` unscored tokens go anywhere."""
    rows, t = labels.shape
    gen = torch.Generator().manual_seed(seed)
    if mode == "sequences":
        source = torch.cat(
            [torch.arange(n * t, (n + 1) * t) for n in torch.randperm(rows, generator=gen)]
        )
    elif mode == "tokens":
        source = torch.randperm(rows * t, generator=gen)
    else:
        raise ValueError(mode)
    ids = source // t
    for _ in range(fillers):
        at = int(torch.randint(0, source.numel() + 1, (1,), generator=gen))
        bogus = int(torch.randint(-3, rows + 3, (1,), generator=gen))
        source = torch.cat([source[:at], torch.tensor([-1]), source[at:]])
        ids = torch.cat([ids[:at], torch.tensor([bogus]), ids[at:]])
    return Packing(source=source, sequence_ids=ids, num_pairs=rows // 2)
