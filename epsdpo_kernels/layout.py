"""Row layout of the small fp32 buffers the kernels exchange.

The per-token pass writes ``(TOKEN_FIELDS, N)`` for N token rows (2B·T padded, or a packed
stream), the token-to-sequence reduction ``(SEQUENCE_FIELDS, 2B)``, the per-pair head
``(PAIR_FIELDS, B)``. Both backends use the same layout, so each step and the autograd code do not
care which backend produced a buffer. The sequence buffer is also what sequence-parallel ranks
add up: every field is a plain sum over tokens.

The two perturbed streams are stored as differences from the policy's log-probability, ``u − a``
and ``d − a``, not as ``u`` and ``d``: the step compares ℓ⁺, ℓ and ℓ⁻, whose gaps (~1e-3 at
ε = 0.01) are far below the fp32 rounding of per-sequence sums of ~−2400; summing the small
per-token differences instead keeps those gaps exact to fp32 precision (docs/SPEC.md, Numerics).
"""

# Per token row (zeros for ignored rows).
TOK_LOGP = 0  # a = log_softmax(h)[y]
TOK_REF_LOGP = 1  # r = log_softmax(g)[y]
TOK_P_EPS_DELTA = 2  # u − a, u = log_softmax(h + ε(h − g))[y]
TOK_N_EPS_DELTA = 3  # d − a, d = log_softmax(h − ε(h − g))[y]
TOK_LSE = 4  # logsumexp(h), the only thing backward needs besides h
TOK_LOGIT_SUM = 5  # Σ_v h[v], for the logits/chosen|rejected metrics
# a − log Σ_v p[v]², p = softmax(h): the token's log-probability against the policy's expected
# probability, WPO's per-token term (its sequence weight is exp of their mean). Only when the
# call asks for ``wpo_weights``; 0 otherwise.
TOK_WPO_LOGP = 6
TOKEN_FIELDS = 7

# Per sequence: sums over its tokens (ignored tokens hold zeros) and its scored-token count.
SEQ_LOGP = 0  # A = Σ a
SEQ_REF_LOGP = 1  # R = Σ r
SEQ_P_EPS_DELTA = 2  # Σ (u − a)
SEQ_N_EPS_DELTA = 3  # Σ (d − a)
SEQ_LOGIT_SUM = 4  # Σ_t Σ_v h
SEQ_WPO_LOGP = 5  # Σ_t (a − log Σ_v p²)
SEQ_COUNT = 6
SEQUENCE_FIELDS = 7
# The token field each summed sequence field (those before SEQ_COUNT, in order) comes from.
SEQ_FROM_TOKEN = (
    TOK_LOGP,
    TOK_REF_LOGP,
    TOK_P_EPS_DELTA,
    TOK_N_EPS_DELTA,
    TOK_LOGIT_SUM,
    TOK_WPO_LOGP,
)

# Per token, one V-split's partial state in the Triton forward (a row's vocabulary split across
# programs, merged by its merge kernel; a vocabulary shard's, before the ranks' merge): the four
# streams' maxes (h, g, mix⁺, mix⁻), their sums relative to those maxes, Σ_v h and (for WPO's
# weights) the policy's Σ exp(2(h − m_h)).
PART_MAXES = 0  # [0, 4)
PART_EXP_SUMS = 4  # [4, 8)
PART_LOGIT_SUM = 8
PART_SQUARES = 9
PARTIAL_FIELDS = 10

# Per token, a vocabulary shard's partials (distributed/vocab_shard.py merges them over the
# shard's ranks: a MAX of the maxes, then a SUM of the rescaled sums): ``(SHARD_MAXES, N)``
# maxes m of the four streams (h, g, mix⁺, mix⁻; −inf where a row reads nothing) and
# ``(SHARD_SUMS, N)`` sums.
SHARD_MAXES = 4
SHARD_EXP_SUMS = 0  # [0, 4): Σ exp(x − m) of the four streams
SHARD_LABEL_H = 4  # the policy's lm_head output z at the label (before the model's logit
SHARD_LABEL_G = 5  # transform), on the rank whose shard holds it, 0 elsewhere; the reference's
SHARD_LOGIT_SUM = 6  # Σ_v h
SHARD_SQUARES = 7  # Σ exp(2(h − m_h)), for TOK_WPO_LOGP; 0 unless asked for
SHARD_SUMS = 8

# Per pair.
PAIR_LOSS = 0
PAIR_STEP = 1
PAIR_BETA_USED = 2
PAIR_CHOSEN_LOGPS = 3
PAIR_REJECTED_LOGPS = 4
PAIR_REF_CHOSEN_LOGPS = 5
PAIR_REF_REJECTED_LOGPS = 6
PAIR_CHOSEN_REWARD = 7
PAIR_REJECTED_REWARD = 8
PAIR_DLOSS_DLOGRATIO = 9  # ∂L_i/∂ℓ_i: the chosen row's gradient coefficient before averaging
PAIR_CHOSEN_COUNT = 10  # scored tokens of the chosen row
PAIR_REJECTED_COUNT = 11
PAIR_CHOSEN_LOGIT_SUM = 12
PAIR_REJECTED_LOGIT_SUM = 13
PAIR_LOGRATIO = 14  # ℓ
PAIR_REF_LOGRATIO = 15  # ℓ_ref
PAIR_P_EPS_LOGRATIO = 16  # ℓ⁺ = ℓ + (ℓ⁺ − ℓ), the difference summed from TOK_P_EPS_DELTA
PAIR_N_EPS_LOGRATIO = 17  # ℓ⁻
PAIR_CHOSEN_WPO_LOGP = 18  # the chosen row's Σ_t (a − log Σ_v p²)
PAIR_REJECTED_WPO_LOGP = 19
PAIR_FIELDS = 20
