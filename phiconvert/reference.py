"""The source model's reference, in float32, without ever holding the model: one decoder layer at a time.

transformers builds the model's skeleton with empty (meta) parameters; a hook loads each decoder layer's weights
from the safetensors files, upcast to float32, just before the layer runs, and drops them after. The embedding
reads only the rows of the tokens at hand, and the LM head is applied in slices of the vocabulary. So the peak is
one layer in float32 plus activations, whatever the model's size (Phi-4-mini: under 3 GiB where a float32 load
takes 22 GiB; Phi-4 14B runs on a machine with less memory than its bf16 weights), while the arithmetic is the
model's own transformers code in float32: masks, rotary embeddings (longrope's short/long switch included) and all.

Greedy chat needs one pass over the weights per step. With a draft (an artifact's reply), one pass checks all its
tokens at once and keeps the longest prefix the source agrees with plus the source's own next token: the result is
exactly the source's greedy reply, in as few passes as the draft is right (speculative decoding's rule for greedy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert import weights
from phiconvert.errors import PhiconvertError

POSITION_CHUNK = 512  # positions whose logits are computed (and written) at a time

Progress = Callable[[int, int], None]  # (done, total)


class SourceModel:
    """A float32 transformers model whose weights are read from disk as each part runs."""

    def __init__(self, folder: Path) -> None:
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):  # rotary tables and other buffers are real, on the CPU
            model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.model = model.eval()
        self.tensors = weights.index(folder)
        self.decoder = model.get_decoder()
        names = {module: name for name, module in model.named_modules()}
        text = self.config.get_text_config(decoder=True)
        embedding = model.get_input_embeddings()
        self.embedding = self._tensor(names[embedding] + ".weight")
        head = model.get_output_embeddings()
        head_name = names[head] + ".weight"
        self.head = self.tensors.get(head_name) or (self.embedding if text.tie_word_embeddings else None)
        if self.head is None:
            raise PhiconvertError(f"the checkpoint has no {head_name} and its embeddings are not tied")
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.vocab = self.head.shape[0]
        embedding.padding_idx = None  # it indexes the full table; the lookup here sees only the rows at hand
        embedding.register_forward_pre_hook(self._lookup)
        embedding.register_forward_hook(lambda module, args, output: self.release_unit(module))
        layers = list(self.decoder.layers)
        self.units = layers + [m for m in self.decoder.children() if m not in (embedding, self.decoder.layers)]
        self.units = [m for m in self.units if any(True for _ in m.parameters())]
        for unit in self.units:
            unit.register_forward_pre_hook(self._load)
            unit.register_forward_hook(self._release)
        self._names = names
        self._pool: dict[tuple, Any] = {}
        self.streaming = True  # False: the caller loads and releases units itself (GPTQ edits a layer's weights)
        self.on_unit: Callable[[], None] = lambda: None

    def _tensor(self, name: str) -> weights.Tensor:
        if name not in self.tensors:
            raise PhiconvertError(f"the checkpoint has no tensor {name}")
        return self.tensors[name]

    def _load(self, module: Any, args: Any) -> None:
        if self.streaming:
            self.load_unit(module)

    def _release(self, module: Any, args: Any, output: Any) -> None:
        if self.streaming:
            self.release_unit(module)
            self.on_unit()

    def load_unit(self, module: Any) -> None:
        """Read ``module``'s weights (a decoder layer, the final norm) from disk into float32 buffers."""
        import torch

        prefix = self._names[module]
        for name, param in list(module.named_parameters()):
            owner, leaf = _owner(module, name)
            key = (name, tuple(param.shape))  # the same buffers for every decoder layer
            if key not in self._pool:
                self._pool[key] = torch.empty(param.shape, dtype=torch.float32)
            tensor = weights.read_torch(self._tensor(f"{prefix}.{name}"), out=self._pool[key])
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)

    def release_unit(self, module: Any) -> None:
        """Drop ``module``'s weights again (its buffers are reused by the next unit)."""
        import torch

        for name, param in list(module.named_parameters()):
            owner, leaf = _owner(module, name)
            owner._parameters[leaf] = torch.nn.Parameter(torch.empty(param.shape, device="meta"), requires_grad=False)

    def _lookup(self, module: Any, args: Any) -> tuple:
        """Load only the embedding rows of the ids at hand; the lookup then indexes that small table."""
        import torch

        ids = args[0]
        rows, inverse = torch.unique(ids, return_inverse=True)
        module._parameters["weight"] = torch.nn.Parameter(
            weights.read_rows(self.embedding, rows.tolist()), requires_grad=False
        )
        return (inverse.reshape(ids.shape),)

    def hidden(self, ids: list[int], cache: Any = None) -> Any:
        """Final hidden states (len(ids), hidden) of ``ids`` after what ``cache`` holds, in float32."""
        import torch

        with torch.no_grad():
            out = self.decoder(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state[0]

    def logits(self, hidden: Any) -> Any:
        """Logits of a few positions' hidden states (positions, vocab), the LM head read in vocabulary slices."""
        import torch

        parts = []
        with torch.no_grad():
            for rows in weights.row_slices(self.head):
                parts.append(hidden @ rows.T)
        logits = torch.cat(parts, dim=-1)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def passes(self) -> int:
        """Units (decoder layers, final norm) run per forward pass: the unit of progress."""
        return len(self.units)


def _owner(module: Any, name: str) -> tuple[Any, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def write_logprobs(model: SourceModel, ids: list[int], path: Path, progress: Progress) -> None:
    """Log-probabilities of every position of ``ids`` into ``path`` (.npy, float32), a chunk of positions at a
    time: a 4k-token window of a 200k vocabulary is 3.5 GB, never whole in memory. Progress counts units, then
    position chunks."""
    import torch

    units, chunks = model.passes(), math.ceil(len(ids) / POSITION_CHUNK)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress(done, units + chunks)

    model.on_unit = tick
    hidden = model.hidden(ids)
    model.on_unit = lambda: None
    with LogprobWriter(path, (len(ids), model.vocab)) as out:
        for start in range(0, len(ids), POSITION_CHUNK):
            logits = model.logits(hidden[start : start + POSITION_CHUNK])
            out.write(torch.log_softmax(logits, dim=-1).numpy())
            tick()


def greedy_reply(
    model: SourceModel, prompt: list[int], max_new: int, stop: set[int], drafts: list[list[int]], progress: Progress
) -> list[int]:
    """The source's greedy continuation of ``prompt`` (at most ``max_new`` tokens, ending at a stop id), checking
    each draft's tokens in one pass where it agrees; with no draft, one token per pass."""
    from transformers import DynamicCache

    # full layers for every layer type: a sliding-window layer cannot be cropped back once past its window, and
    # the masks (built from the config, not the cache) keep sliding layers to their window anyway
    cache = DynamicCache()
    reply: list[int] = []
    pending = list(prompt)  # ids not yet in the cache: the prompt, then the last token chosen
    while len(reply) < max_new and not (reply and reply[-1] in stop):
        draft = next((d[len(reply) :] for d in drafts if d[: len(reply)] == reply and len(d) > len(reply)), [])
        draft = draft[: max_new - len(reply) - 1]
        cached = cache.get_seq_length()
        hidden = model.hidden(pending + draft, cache)
        # row len(pending) - 1 predicts the first draft token; each row after it, the token after that draft token
        guesses = model.logits(hidden[len(pending) - 1 :]).argmax(-1).tolist()
        accepted, stopped = 0, False
        while accepted < len(draft) and not stopped and guesses[accepted] == draft[accepted]:
            stopped = draft[accepted] in stop
            accepted += 1
        reply += draft[:accepted] + ([] if stopped else [guesses[accepted]])
        cache.crop(cached + len(pending) + accepted)  # keep what the source agreed with, drop the rest of the draft
        pending = [] if stopped else [reply[-1]]
        progress(min(len(reply), max_new), max_new)
    return reply


class LogprobWriter:
    """A float32 .npy file written row chunk by row chunk (no memory map: its pages would count as ours)."""

    def __init__(self, path: Path, shape: tuple[int, int]) -> None:
        self.path, self.shape, self.rows = path, shape, 0

    def __enter__(self) -> LogprobWriter:
        self.file = open(self.path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": "<f4", "fortran_order": False, "shape": self.shape})
        return self

    def write(self, rows: np.ndarray) -> None:
        np.ascontiguousarray(rows, dtype=np.float32).tofile(self.file)
        self.rows += len(rows)

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if exc[0] is None and self.rows != self.shape[0]:
            raise PhiconvertError(f"{self.path.name}: wrote {self.rows} of {self.shape[0]} rows")
