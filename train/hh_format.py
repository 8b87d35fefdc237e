"""Rows in Anthropic HH-RLHF's published format, generated: for the tests and benchmarks, which
must not download the real file.

HH-RLHF ships gzipped JSONL whose rows are ``{"chosen": "\\n\\nHuman: … \\n\\nAssistant: …",
"rejected": …}``: implicit prompts, multi-turn, the two responses often sharing their first words,
and in some rows one response a prefix of the other. These rows have all of that, plus one row
whose two responses are identical (cannot form a pair).
"""

from __future__ import annotations

import gzip
import json
import random

_TOPICS = ["a garden", "the weather", "a recipe", "a bicycle", "the ocean", "a library"]
_OPENERS = [" I think", " I'm not sure, but", " Sure,", " Human:", " Well,", " Yes,"]


def hh_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        turns = f"\n\nHuman: Tell me about {topic}.\n\nAssistant: It is nice."
        for _ in range(rng.randint(1, 3)):  # multi-turn, as most HH prompts are
            turns += f"\n\nHuman: Why is {topic} nice?\n\nAssistant: People like {topic}."
        turns += "\n\nHuman: Anything else?"
        opener = rng.choice(_OPENERS)
        good = f"{opener} {topic} is calm and pleasant to think about."
        bad = f"{opener} no."
        kind = i % 10
        if kind == 3:  # the rejected response is a prefix of the chosen one
            bad = good[: len(good) // 2]
        elif kind == 7:  # the chosen response is a prefix of the rejected one
            good, bad = bad, bad + " Go away and never ask again."
        rows.append(
            {"chosen": f"{turns}\n\nAssistant:{good}", "rejected": f"{turns}\n\nAssistant:{bad}"}
        )
    rows[5] = {"chosen": rows[5]["chosen"], "rejected": rows[5]["chosen"]}  # identical
    return rows


def write_hh_jsonl_gz(path, n: int = 200, seed: int = 0) -> list[dict]:
    rows = hh_rows(n, seed)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows
