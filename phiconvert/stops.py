"""Which tokens end a chat reply, read from the model itself: one rule for the source and every runtime.

A chat model's reply ends at its end-of-turn token (Phi's `<|end|>`, Llama-3's `<|eot_id|>`, ChatML's `<|im_end|>`),
which is often not the tokenizer's eos (Phi-3: `<|endoftext|>`) and not always listed in its generation config.
The chat template says which it is: the special token it writes right after an assistant message. So the stop ids
are the generation config's eos ids, that token, and the tokenizer's eos, in that order; a runtime that reads only
one of these places is given the whole list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROBE = "phiconvert probe reply"


def end_of_turn(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant message, or None (no template, or
    one that writes no special token there)."""
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # no template, or one that refuses this conversation: jinja raises its own errors
        return None
    if PROBE not in text:
        return None
    after = text[text.rindex(PROBE) + len(PROBE) :].lstrip(" ")
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens)
    return next((s for s in sorted(specials, key=len, reverse=True) if after.startswith(s)), None)


def generation_eos(folder: Path) -> list[int]:
    """generation_config.json's eos ids (an int or a list there), else config.json's."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [eos]
    return []


def stop_ids(folder: Path, tokenizer: Any) -> list[int]:
    """Every id that ends a reply of the model in ``folder``: its eos ids, its end-of-turn token, its tokenizer's
    eos; without duplicates, in that order."""
    ids = generation_eos(folder)
    eot = end_of_turn(tokenizer)
    for token_id in (tokenizer.convert_tokens_to_ids(eot) if eot else None, tokenizer.eos_token_id):
        if isinstance(token_id, int) and token_id not in ids:
            ids.append(token_id)
    return ids
