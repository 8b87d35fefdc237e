"""The buffer fields of layout.py as compile-time constants the Triton kernels can use.

One list for every Triton module, so that a field added to layout.py is declared here once (a
Triton kernel reads only module globals that are ``tl.constexpr``; layout.py itself stays free of
Triton for the torch backend).
"""

from __future__ import annotations

import triton.language as tl

from .. import layout as L

TOK_LOGP = tl.constexpr(L.TOK_LOGP)
TOK_REF_LOGP = tl.constexpr(L.TOK_REF_LOGP)
TOK_P_EPS_DELTA = tl.constexpr(L.TOK_P_EPS_DELTA)
TOK_N_EPS_DELTA = tl.constexpr(L.TOK_N_EPS_DELTA)
TOK_LSE = tl.constexpr(L.TOK_LSE)
TOK_LOGIT_SUM = tl.constexpr(L.TOK_LOGIT_SUM)
TOK_WPO_LOGP = tl.constexpr(L.TOK_WPO_LOGP)
TOKEN_FIELDS = tl.constexpr(L.TOKEN_FIELDS)

SEQ_LOGP = tl.constexpr(L.SEQ_LOGP)
SEQ_REF_LOGP = tl.constexpr(L.SEQ_REF_LOGP)
SEQ_P_EPS_DELTA = tl.constexpr(L.SEQ_P_EPS_DELTA)
SEQ_N_EPS_DELTA = tl.constexpr(L.SEQ_N_EPS_DELTA)
SEQ_LOGIT_SUM = tl.constexpr(L.SEQ_LOGIT_SUM)
SEQ_WPO_LOGP = tl.constexpr(L.SEQ_WPO_LOGP)
SEQ_COUNT = tl.constexpr(L.SEQ_COUNT)

PART_MAXES = tl.constexpr(L.PART_MAXES)
PART_EXP_SUMS = tl.constexpr(L.PART_EXP_SUMS)
PART_LOGIT_SUM = tl.constexpr(L.PART_LOGIT_SUM)
PART_SQUARES = tl.constexpr(L.PART_SQUARES)
PARTIAL_FIELDS = tl.constexpr(L.PARTIAL_FIELDS)

SHARD_EXP_SUMS = tl.constexpr(L.SHARD_EXP_SUMS)
SHARD_LABEL_H = tl.constexpr(L.SHARD_LABEL_H)
SHARD_LABEL_G = tl.constexpr(L.SHARD_LABEL_G)
SHARD_LOGIT_SUM = tl.constexpr(L.SHARD_LOGIT_SUM)
SHARD_SQUARES = tl.constexpr(L.SHARD_SQUARES)

PAIR_LOSS = tl.constexpr(L.PAIR_LOSS)
PAIR_STEP = tl.constexpr(L.PAIR_STEP)
PAIR_BETA_USED = tl.constexpr(L.PAIR_BETA_USED)
PAIR_CHOSEN_LOGPS = tl.constexpr(L.PAIR_CHOSEN_LOGPS)
PAIR_REJECTED_LOGPS = tl.constexpr(L.PAIR_REJECTED_LOGPS)
PAIR_REF_CHOSEN_LOGPS = tl.constexpr(L.PAIR_REF_CHOSEN_LOGPS)
PAIR_REF_REJECTED_LOGPS = tl.constexpr(L.PAIR_REF_REJECTED_LOGPS)
PAIR_CHOSEN_REWARD = tl.constexpr(L.PAIR_CHOSEN_REWARD)
PAIR_REJECTED_REWARD = tl.constexpr(L.PAIR_REJECTED_REWARD)
PAIR_DLOSS_DLOGRATIO = tl.constexpr(L.PAIR_DLOSS_DLOGRATIO)
PAIR_CHOSEN_COUNT = tl.constexpr(L.PAIR_CHOSEN_COUNT)
PAIR_REJECTED_COUNT = tl.constexpr(L.PAIR_REJECTED_COUNT)
PAIR_CHOSEN_LOGIT_SUM = tl.constexpr(L.PAIR_CHOSEN_LOGIT_SUM)
PAIR_REJECTED_LOGIT_SUM = tl.constexpr(L.PAIR_REJECTED_LOGIT_SUM)
PAIR_LOGRATIO = tl.constexpr(L.PAIR_LOGRATIO)
PAIR_REF_LOGRATIO = tl.constexpr(L.PAIR_REF_LOGRATIO)
PAIR_P_EPS_LOGRATIO = tl.constexpr(L.PAIR_P_EPS_LOGRATIO)
PAIR_N_EPS_LOGRATIO = tl.constexpr(L.PAIR_N_EPS_LOGRATIO)
PAIR_CHOSEN_WPO_LOGP = tl.constexpr(L.PAIR_CHOSEN_WPO_LOGP)
PAIR_REJECTED_WPO_LOGP = tl.constexpr(L.PAIR_REJECTED_WPO_LOGP)
