"""The Triton backend, by op: the per-token forward (forward.py) and backward (backward.py), the
log-sum-exp math they share (lse.py), a vocabulary shard's partials (vocab_shard.py), the
per-sequence sums and the pair head; the launch policy and every launch in launch.py. Imported
only when used (steps.py): CPU users need no working Triton install."""

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
