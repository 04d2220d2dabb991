"""The loop state of one generation (token LMs): what the scheduler needs to keep a session's
row in consecutive batches, one token per iteration (continuous batching).

A generation is a request that re-enters the scheduler's queue after every iteration: the first
iteration feeds the prompt (or, for an empty prompt, the token sampled from the session's stored
last prediction), every later one feeds the token sampled after the previous one. Its state stays
in memory between iterations *and* each iteration's write is a compare-and-set on the revision
the previous one wrote, so

* a token is streamed only after the write that applied it landed (every streamed token is
  applied; a generation that stops, for whatever reason, stops at a token boundary);
* a writer that races the generation (another replica, a reset) makes the next write fail and
  ends the generation with a conflict: nothing is ever applied twice or on a foreign history.

``sample_next`` samples the next tokens of every continuing generation of a batch in one
vectorised call (``service.engine.sampling``).
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from service.config import Settings
from service.engine.contract import ModelContract
from service.engine.sampling import SamplingParams, sample
from service.engine.tensors import unpack_arrays
from service.engine.validation import integral
from service.errors import InvalidInput

FinishReason = Literal["length", "stop", "cancelled"]
GENERATE_FIELDS = frozenset({"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "step"})
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
Chunk = dict[str, np.ndarray]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, sent after the write that applied it: the session is at ``step``."""

    token: int
    text: str
    step: int


@dataclass(frozen=True)
class DoneEvent:
    """The end of a generation: every token of ``tokens`` is applied, the session is at ``step``.
    ``logits`` is the prediction after the last token (None when nothing ran)."""

    step: int
    tokens: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    logits: np.ndarray | None = None


GenerationEvent = TokenEvent | DoneEvent


def encode_prompt(contract: ModelContract, prompt: str | Sequence[int]) -> np.ndarray:
    """A prompt as token ids ``[T]`` (T may be 0): text one character per token, characters outside
    the vocab as ``unk_id``; a list of ids checked against the vocab size."""
    if contract.kind != "token_lm" or contract.vocab is None or contract.unk_id is None:
        raise InvalidInput("generation needs a token LM; this session's model takes features")
    dtype = contract.inputs[0].dtype
    vocab = contract.vocab
    if isinstance(prompt, str):
        index = {t: i for i, t in enumerate(vocab)}
        return np.array([index.get(ch, contract.unk_id) for ch in prompt], dtype=dtype)
    bad = [t for t in prompt if not 0 <= t < len(vocab)]
    if bad:
        raise InvalidInput(f"prompt token {bad[0]} is outside the vocab (ids 0..{len(vocab) - 1})")
    return np.array(prompt, dtype=dtype)


def _last_prediction(contract: ModelContract, last_reply: bytes) -> np.ndarray:
    """The logits after the last consumed token, from the session's stored last reply: what an
    empty prompt continues from. Reset, forked and imported sessions have none."""
    if not last_reply:
        raise InvalidInput(
            "the prompt is empty and the session has no prediction to continue from "
            "(it consumed nothing since it was created, reset, forked or imported): send a prompt"
        )
    logits: np.ndarray = unpack_arrays(last_reply)[contract.outputs[0].name][-1]
    return logits


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GenerateCall:
    """One generation as every transport hands it over (token LMs): ``prompt`` text or ids (empty:
    continue from the session's last prediction), checked against the vocab when submitted; the
    sampling fields; ``expected_step`` as for a step (checked by ``SessionService.generate``
    with the one ``step`` rule). Built valid or not at all."""

    prompt: str | tuple[int, ...] = ""
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    expected_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k", "seed"):  # JSON's 3.0 is 3, as for every integer field
            object.__setattr__(self, name, integral(getattr(self, name)))
        if isinstance(self.prompt, tuple):
            object.__setattr__(self, "prompt", tuple(integral(t) for t in self.prompt))
        if not isinstance(self.prompt, str | tuple) or (
            isinstance(self.prompt, tuple) and not all(_is_int(t) for t in self.prompt)
        ):
            raise InvalidInput("'prompt' must be a string or a list of token ids")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidInput("'max_tokens' must be a positive integer")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidInput("'temperature' must be a number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidInput("'top_k' must be an integer >= 0 (0 = no top-k cut)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidInput("'top_p' must be a number in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise InvalidInput("'seed' must be an integer in [0, 2**64)")
        if (
            not isinstance(self.stop, tuple)
            or len(self.stop) > MAX_STOP_STRINGS
            or not all(isinstance(t, str) and 0 < len(t) <= MAX_STOP_CHARS for t in self.stop)
        ):
            raise InvalidInput(
                f"'stop' must be up to {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars"
            )


def parse_generate(body: object, *, transport_fields: frozenset[str] = frozenset()) -> GenerateCall:
    """THE parser of a generation: a decoded JSON object ``{"prompt": ..., "max_tokens": n, ...}``
    → ``GenerateCall`` (``transport_fields`` as for ``parse_step``)."""
    if not isinstance(body, dict):
        raise InvalidInput('a generation must be a JSON object: {"prompt": "...", "max_tokens": n, ...}')
    unknown = sorted(set(body) - GENERATE_FIELDS - transport_fields)
    if unknown:
        raise InvalidInput(f"unknown field(s) {unknown}; a generation takes {sorted(GENERATE_FIELDS)}")
    fields = {k: v for k, v in body.items() if k in GENERATE_FIELDS and v is not None}
    prompt, stop = fields.pop("prompt", ""), fields.pop("stop", ())
    return GenerateCall(
        prompt=tuple(prompt) if isinstance(prompt, list) else prompt,
        stop=(stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop,
        expected_step=fields.pop("step", None),
        **fields,
    )


class Generation:
    """One running generation: its parameters, its own random generator, the tokens applied so
    far and the events for its consumer (a queue, read by ``service.sessions``)."""

    def __init__(
        self,
        contract: ModelContract,
        prompt: np.ndarray,
        max_tokens: int,
        params: SamplingParams,
        seed: int,
        stop: Sequence[str] = (),
    ) -> None:
        assert contract.vocab is not None
        self.contract = contract
        self.input = contract.inputs[0]
        self.logits_name = contract.outputs[0].name
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.params = params
        self.seed = seed
        self.stop = tuple(stop)
        self.events: asyncio.Queue[GenerationEvent | asyncio.Future[Any]] = asyncio.Queue()
        self.cancelled = False
        self.digest = f"generate:{secrets.token_hex(8)}"  # no step has it: a generation is never replayed
        self.prompt_chunks: list[Chunk] = []  # the prompt cut at max_chunk (set by the scheduler)
        self.restart()

    def restart(self) -> None:
        """Back to the start (a compare-and-set lost before anything was applied): same seed."""
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.tokens: list[int] = []
        self.text = ""
        self.pending: int | None = None  # the token fed in the current iteration, not yet applied
        self.started = False  # a write landed: from now on the generation cannot start over
        self.last_logits: np.ndarray | None = None
        self.finished = False

    def cancel(self) -> None:
        """Stop at the next token boundary (the consumer went away or asked to stop)."""
        self.cancelled = True

    def feed(self, token: int) -> Chunk:
        """The next iteration's input: ``token``, applied when that iteration's write lands."""
        self.pending = token
        return {self.input.name: np.array([token], dtype=self.input.dtype)}

    def applied(self, step: int, logits: np.ndarray) -> bool:
        """An iteration's write landed (the session is at ``step``; ``logits`` predict the next
        token): stream the token it applied, then say whether to go on."""
        self.started, self.last_logits = True, logits
        reason: FinishReason | None = None
        if self.pending is not None:
            token, self.pending = self.pending, None
            text = self.contract.vocab[token] if self.contract.vocab else ""
            self.tokens.append(token)
            self.text += text
            self.events.put_nowait(TokenEvent(token, text, step))
            if len(self.tokens) >= self.max_tokens:
                reason = "length"
            elif any(s in self.text[-(len(s) + len(text) - 1) :] for s in self.stop):
                reason = "stop"  # the token completed a stop string (which is kept and applied)
        if reason is None and self.cancelled:
            reason = "cancelled"
        if reason is not None:
            self.finish(reason, step, logits)
        return reason is None

    def finish(self, reason: FinishReason, step: int, logits: np.ndarray | None = None) -> None:
        self.finished = True
        logits = logits if logits is not None else self.last_logits
        self.events.put_nowait(DoneEvent(step, tuple(self.tokens), self.text, reason, logits))


def sample_next(generations: Sequence[Generation], logits: np.ndarray) -> list[Chunk]:
    """The next input of each generation: its next token, sampled from its row of ``logits``
    ``[G, V]`` in one vectorised call (one uniform per row from that generation's generator)."""
    tokens = sample(
        logits,
        np.array([g.params.temperature for g in generations]),
        np.array([g.params.top_k for g in generations]),
        np.array([g.params.top_p for g in generations]),
        np.array([g.rng.random() for g in generations]),
    )
    return [g.feed(int(t)) for g, t in zip(generations, tokens, strict=True)]


def new_generation(contract: ModelContract, call: GenerateCall, settings: Settings) -> Generation:
    """The generation ``call`` asks for on a model with ``contract``: its prompt checked against
    the vocab and ``max_steps_per_request``, ``max_tokens`` against ``max_generate_tokens``; a
    random seed when it names none."""
    if call.max_tokens > settings.max_generate_tokens:
        raise InvalidInput(f"'max_tokens' must be at most {settings.max_generate_tokens}")
    prompt = encode_prompt(contract, call.prompt)
    if len(prompt) > settings.max_steps_per_request:
        raise InvalidInput(f"the prompt is over the limit of {settings.max_steps_per_request} tokens")
    params = SamplingParams(float(call.temperature), call.top_k, float(call.top_p))
    seed = call.seed if call.seed is not None else secrets.randbits(63)
    return Generation(contract, prompt, call.max_tokens, params, seed, call.stop)


def first_inputs(generations: Sequence[Generation | None], last_replies: Sequence[bytes]) -> list[Chunk | InvalidInput]:
    """Generations with an empty prompt, just admitted: each one's first input is the token
    sampled from its session's stored last prediction (or the error: there is none)."""
    found: list[tuple[Generation, np.ndarray]] = []
    out: list[Chunk | InvalidInput] = []
    for g, reply in zip(generations, last_replies, strict=True):
        assert g is not None
        try:
            found.append((g, _last_prediction(g.contract, reply)))
            out.append({})
        except InvalidInput as e:
            out.append(e)
    if found:
        firsts = iter(sample_next([g for g, _ in found], np.stack([row for _, row in found])))
        out = [next(firsts) if not isinstance(o, InvalidInput) else o for o in out]
    return out


def advance(
    generations: Sequence[Generation | None], steps: Sequence[int], outputs: Sequence[Mapping[str, np.ndarray]]
) -> list[Chunk | None]:
    """After a batch's writes landed: each generation streams the token its iteration applied
    (the session now at ``steps[i]``; ``outputs[i]`` its iteration's outputs); per generation,
    its next input, or None when it has finished (its ``DoneEvent`` is queued)."""
    going: list[tuple[int, Generation, np.ndarray]] = []
    out: list[Chunk | None] = [None] * len(generations)
    for i, (g, step, o) in enumerate(zip(generations, steps, outputs, strict=True)):
        assert g is not None
        logits = o[g.logits_name][-1]
        if g.applied(step, logits):
            going.append((i, g, logits))
    if going:
        chunks = sample_next([g for _, g, _ in going], np.stack([row for _, _, row in going]))
        for (i, _, _), chunk in zip(going, chunks, strict=True):
            out[i] = chunk
    return out


class GenerationStream:
    """The consumer's side of a generation: an async iterator of its events (``TokenEvent``s,
    then one ``DoneEvent``), raising the ``CarryoverError`` that ended it otherwise. ``cancel``
    stops it at the next token boundary (call it when the consumer goes away)."""

    def __init__(self, generation: Generation, future: asyncio.Future[Any]) -> None:
        self.generation = generation
        self._over = False
        future.add_done_callback(generation.events.put_nowait)  # after the last event, in order

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._over:
            raise StopAsyncIteration
        item = await self.generation.events.get()
        if isinstance(item, asyncio.Future):  # the end without a DoneEvent: an error
            self._over = True
            if not item.cancelled() and (error := item.exception()) is not None:
                raise error
            raise StopAsyncIteration
        self._over = isinstance(item, DoneEvent)
        return item

    def cancel(self) -> None:
        self.generation.cancel()
