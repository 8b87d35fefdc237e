"""The Triton backend, by op: the per-token forward (forward.py) and backward (backward.py), the
log-sum-exp math they share (lse.py), a vocabulary shard's partials (vocab_shard.py), the
per-sequence sums and the pair head; the launch policy and every launch in launch.py. Imported
only when used (steps.py): CPU users need no working Triton install."""

from .backward import token_backward as token_backward
from .forward import token_forward as token_forward
from .pair_head import pair_head as pair_head
from .sequence_sums import sequence_sums as sequence_sums
from .vocab_shard import stats_from_partials as stats_from_partials
from .vocab_shard import token_partials as token_partials
