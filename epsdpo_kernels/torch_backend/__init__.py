"""The torch backend: the same steps as the Triton backend, in plain torch (the CPU path), and a
vocabulary shard's per-token partials on both backends."""

from .backward import token_backward
from .forward import token_forward
from .pair_head import pair_head
from .sequence_sums import sequence_sums
from .vocab_shard import stats_from_partials, token_partials

__all__ = [
    "pair_head",
    "sequence_sums",
    "stats_from_partials",
    "token_backward",
    "token_forward",
    "token_partials",
]
