"""Build phiconvert's two bundled lm-eval tasks from the held-out text (the pydoc topics; PSF licence).

    python scripts/build_eval_tasks.py

Deterministic (seeded). Both tasks use prose lines of `phiconvert/fixtures/heldout.txt` (no fixture was trained on
that text), so they measure what a model learned about Python's reference prose, not what it memorised:

- pydoc_cloze (multiple choice, loglikelihood): the start of a line and the line before it; which of four endings
  is the real one (the other three are its own words in another order: only word order tells them apart, which
  is what a broken position encoding loses). Chance is 25 %.
- pydoc_next_word (generative, exact match): the same kind of context; generate the next word.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "phiconvert" / "fixtures" / "heldout.txt"
OUT = ROOT / "phiconvert" / "evals"
ITEMS = 120  # per task


def prose_lines(text: str) -> list[tuple[str, str]]:
    """(previous line, line) pairs of prose: at least 8 words, starting with a letter, not code or a rule."""
    lines = [line.strip() for line in text.splitlines()]
    pairs = []
    for previous, line in itertools.pairwise(lines):
        words = line.split()
        if len(words) >= 8 and re.match(r"[A-Za-z]", line) and "::=" not in line and not line.startswith(">>>"):
            pairs.append((previous, line))
    return pairs


def main() -> None:
    rng = random.Random(0)
    pairs = prose_lines(HELDOUT.read_text())
    rng.shuffle(pairs)
    cloze, next_word = [], []
    for i, (previous, line) in enumerate(pairs[: ITEMS * 2]):
        words = line.split()
        cut = len(words) // 2
        context = (previous + "\n" if previous else "") + " ".join(words[:cut])
        if i % 2 == 0 and len(cloze) < ITEMS:
            true = words[cut:]
            endings: list[str] = []
            while len(endings) < 3:  # the same words in another order: only word order tells them apart
                shuffled = rng.sample(true, len(true))
                if shuffled != true and " ".join(shuffled) not in endings:
                    endings.append(" ".join(shuffled))
            answer = rng.randrange(4)
            endings.insert(answer, " ".join(true))
            cloze.append({"context": context, "endings": [" " + e for e in endings], "label": answer})
        elif len(next_word) < ITEMS:
            word = re.sub(r"\W+$", "", words[cut])
            if word:
                next_word.append({"context": context, "word": word})
    OUT.mkdir(exist_ok=True)
    for name, items in (("pydoc_cloze", cloze), ("pydoc_next_word", next_word)):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
        print(f"{name}: {len(items)} items")


if __name__ == "__main__":
    main()
