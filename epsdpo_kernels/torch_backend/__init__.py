"""The torch backend: the same steps as the Triton backend, in plain torch (the CPU path), and a
vocabulary shard's per-token partials on both backends."""

from .backward import token_backward as token_backward
from .forward import token_forward as token_forward
from .pair_head import pair_head as pair_head
from .sequence_sums import sequence_sums as sequence_sums
from .vocab_shard import stats_from_partials as stats_from_partials
from .vocab_shard import token_partials as token_partials
