"""Inputs the tests build: logits batches, hidden-state batches, the multi-process head case."""

from __future__ import annotations

import torch

from epsdpo_kernels import LinearEpsilonDPOHead


def make_batch(
    b,
    t,
    v,
    *,
    dtype=torch.float32,
    device="cpu",
    scale=1.0,
    prompt_frac=0.3,
    seed=0,
    ignore_index=-100,
    ragged=True,
    empty_rows=(),
):
    """Random (policy, ref, labels) with a prompt prefix and ragged padding per row.

    The reference logits are the policy's plus noise, as after SFT, so the ε-mixes differ from
    the policy by O(ε) and ties between log-ratios are rare but not absurdly far apart.
    """
    gen = torch.Generator().manual_seed(seed)
    policy = torch.randn(2 * b, t, v, generator=gen) * scale
    ref = policy + 0.5 * scale * torch.randn(2 * b, t, v, generator=gen)
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    prompt = int(prompt_frac * t)
    labels[:, :prompt] = ignore_index
    if ragged:
        for n in range(2 * b):
            pad = int(torch.randint(0, max(1, (t - prompt) // 2 + 1), (1,), generator=gen))
            if pad:
                labels[n, t - pad :] = ignore_index
    for n in empty_rows:
        labels[n] = ignore_index
    return (
        policy.to(device=device, dtype=dtype),
        ref.to(device=device, dtype=dtype),
        labels.to(device),
    )


def make_linear_batch(b, t, h, v, *, dtype, device, bias, prompt_frac=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    ref_hidden = hidden + 0.3 * torch.randn(2 * b, t, h, generator=gen)
    ref_weight = weight + 0.3 * torch.randn(v, h, generator=gen) / h**0.5
    policy_bias = 0.1 * torch.randn(v, generator=gen) if bias else None
    ref_bias = 0.1 * torch.randn(v, generator=gen) if bias else None
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    scored = torch.rand(2 * b, t, generator=gen) >= prompt_frac
    labels[~scored] = -100
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        policy_hidden=cast(hidden),
        policy_weight=cast(weight),
        policy_bias=cast(policy_bias),
        ref_hidden=cast(ref_hidden),
        ref_weight=cast(ref_weight),
        ref_bias=cast(ref_bias),
        labels=labels.to(device),
    )


def head_case():
    """The seeded head (8 → 50, with bias) and the 4-pair batch of the multi-process tests."""
    torch.manual_seed(0)
    head = LinearEpsilonDPOHead(torch.nn.Linear(8, 50))
    return head, make_linear_batch(4, 5, 8, 50, dtype=torch.float32, device="cpu", bias=True)


def run_head(module, data, rows=slice(None)):
    """The head (or its DDP/FSDP wrapper) on ``rows`` of the batch from ``head_case``."""
    return module(
        data["ref_hidden"][rows] * 1.1,
        data["ref_hidden"][rows],
        data["ref_weight"],
        data["labels"][rows],
        ref_bias=data["ref_bias"],
        beta=0.1,
        epsilon=0.2,
        backend="torch",
    )


def rank_rows(rank: int, world: int, pairs: int = 4) -> torch.Tensor:
    """Rank ``rank``'s share of a batch of ``pairs``: its own pairs, chosen rows then rejected."""
    b = pairs // world
    mine = torch.arange(rank * b, rank * b + b)
    return torch.cat([mine, pairs + mine])
