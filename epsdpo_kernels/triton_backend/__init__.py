"""The Triton backend: the per-token kernels (with the merge of vocabulary partials they use),
the per-sequence sums and the pair head, each launched on its tensors' device. Imported only when
used (steps.py): CPU users need no working Triton install."""

from .pair_head import pair_head
from .sequence_sums import sequence_sums
from .token import token_backward, token_forward
from .vocab_shard import stats_from_partials, token_partials

__all__ = [
    "pair_head",
    "sequence_sums",
    "stats_from_partials",
    "token_backward",
    "token_forward",
    "token_partials",
]
