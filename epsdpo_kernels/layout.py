"""Row layout of the small fp32 buffers the kernels exchange.

The per-token pass writes ``(TOKEN_FIELDS, N)`` for N = 2B·T token rows, the per-pair head writes
``(PAIR_FIELDS, B)``. Both backends use the same layout, so the head and the autograd code do not
care which backend produced a buffer.
"""

# Per token row (zeros for ignored rows).
TOK_LOGP = 0  # a = log_softmax(h)[y]
TOK_REF_LOGP = 1  # r = log_softmax(g)[y]
TOK_P_EPS_LOGP = 2  # u = log_softmax((1+ε)h − εg)[y]
TOK_N_EPS_LOGP = 3  # d = log_softmax((1−ε)h + εg)[y]
TOK_LSE = 4  # logsumexp(h), the only thing backward needs besides h
TOK_LOGIT_SUM = 5  # Σ_v h[v], for the logits/chosen|rejected metrics
TOKEN_FIELDS = 6

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
PAIR_LOGRATIO = 14
PAIR_REF_LOGRATIO = 15
PAIR_P_EPS_LOGRATIO = 16
PAIR_N_EPS_LOGRATIO = 17
PAIR_FIELDS = 18
