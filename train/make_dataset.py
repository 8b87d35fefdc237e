"""Generate the small preference dataset the embedded default trains on.

    python train/make_dataset.py            # rewrites train/pairs/default/{train,eval}.jsonl

Explicit-prompt rows (TRL's standard format). The chosen answer is a plain, well-formed
lowercase sentence about the prompt's subject; the rejected one says the same with a corruption
a byte-level model can learn to disprefer from a few hundred pairs: random capitals and digits,
a stutter, or a truncated answer. Held-out rows use the same templates with other seeds, so
eval reward accuracy measures whether the preference generalised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from train.cli import ArgumentParser

COLORS = ["red", "blue", "green", "grey", "brown", "white", "black", "golden", "silver", "pink"]
ANIMALS = ["fox", "cat", "dog", "owl", "bear", "frog", "duck", "wolf", "deer", "goat", "crab"]
PLACES = ["forest", "river", "garden", "desert", "city", "meadow", "cave", "harbor", "valley"]
VERBS = ["sleep", "run", "swim", "sing", "hunt", "read", "dance", "climb", "play"]
PROMPTS = [
    "Tell me about the {color} {animal}.",
    "Where does the {color} {animal} live?",
    "Describe the {color} {animal} in one sentence.",
    "What does the {color} {animal} like to do?",
]


def _corrupt(text: str, rng: random.Random) -> str:
    kind = rng.choice(["noise", "stutter", "truncate"])
    if kind == "noise":
        swap = {"a": "4", "e": "3", "o": "0", "i": "1", "s": "5"}
        return "".join(
            swap[c]
            if c in swap and rng.random() < 0.4
            else (c.upper() if rng.random() < 0.3 else c)
            for c in text
        )
    words = text.split()
    if kind == "stutter":
        k = rng.randrange(len(words))
        return " " + " ".join(words[: k + 1] + [words[k]] * rng.randint(3, 5) + words[k + 1 :])
    return " " + " ".join(words[: rng.randint(2, max(2, len(words) // 2))])


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color, animal = rng.choice(COLORS), rng.choice(ANIMALS)
        place, verb = rng.choice(PLACES), rng.choice(VERBS)
        prompt = rng.choice(PROMPTS).format(color=color, animal=animal)
        chosen = f" the {color} {animal} lives in the {place} and likes to {verb}."
        rows.append(dict(prompt=prompt, chosen=chosen, rejected=_corrupt(chosen, rng)))
    return rows


def main(argv=None) -> None:
    # --help prints this and writes nothing; the script takes no other arguments.
    ArgumentParser(
        prog="train/make_dataset.py",
        description=__doc__.split("\n\n")[0],
        epilog="Rewrites train/pairs/default/train.jsonl and eval.jsonl (deterministic: the "
        "same rows every time).",
    ).parse_args(argv)
    out = Path(__file__).resolve().parent / "pairs" / "default"
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", 1200, 0), ("eval", 128, 1)):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in make_rows(n, seed):
                f.write(json.dumps(row) + "\n")
        print(f"wrote {n} rows to {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
