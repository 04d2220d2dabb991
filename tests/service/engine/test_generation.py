"""Generation with continuous batching, through a real engine (real Redis, real ONNX Runtime):
greedy equals the offline greedy run, the session consumes prompt and tokens, seeds reproduce,
cancellation stops at a token boundary, concurrent generations share batches with steps."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.engine.generation import DoneEvent, GenerateCall, TokenEvent, parse_generate
from service.engine.model import RecurrentModel
from service.errors import InvalidInput, StepConflict
from service.sessions import SessionService
from tests.engines import exported_state, running_engine

PROMPT = "def main(x):\n    return "


def offline_greedy(
    model: RecurrentModel, prompt: np.ndarray, n: int
) -> tuple[list[int], dict[str, np.ndarray], np.ndarray]:
    """The reference: the model alone, B = 1, the prompt then one argmax token at a time."""
    name, logits_name = model.contract.inputs[0].name, model.contract.outputs[0].name
    states = model.contract.initial_states(1)
    x, tokens = prompt, []
    for i in range(n + 1):
        result = model.run({name: x[None]}, np.ones((1, len(x)), bool), states)
        states, logits = result.states, result.outputs[logits_name][0, -1]
        if i == n:
            break
        tokens.append(int(np.argmax(logits)))
        x = np.array([tokens[-1]], dtype=model.contract.inputs[0].dtype)
    return tokens, {k: v[0] for k, v in states.items()}, logits


def encode(model: RecurrentModel, text: str) -> np.ndarray:
    vocab = model.contract.vocab or ()
    return np.array([vocab.index(c) for c in text], dtype=model.contract.inputs[0].dtype)


async def collect(engine: SessionService, sid: str, call: GenerateCall) -> tuple[list[TokenEvent], DoneEvent]:
    tokens: list[TokenEvent] = []
    async for event in await engine.generate(sid, call):
        if isinstance(event, DoneEvent):
            return tokens, event
        tokens.append(event)
    raise AssertionError("the stream ended without a done event")


async def test_greedy_equals_the_offline_greedy_run(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["charlm"]
    async with running_engine(redis_url, {"charlm": model}, max_chunk=8) as engine:
        sid = (await engine.create()).session_id
        events, done = await collect(engine, sid, GenerateCall(PROMPT, max_tokens=30, temperature=0))
        ref_tokens, ref_state, ref_logits = offline_greedy(model, encode(model, PROMPT), 30)
        assert [e.token for e in events] == ref_tokens == list(done.tokens)
        assert [e.step for e in events] == list(range(len(PROMPT) + 1, len(PROMPT) + 31))
        assert done.step == len(PROMPT) + 30 and done.finish_reason == "length"
        assert done.text == "".join(e.text for e in events) == "".join(model.contract.vocab[t] for t in ref_tokens)  # type: ignore[index]
        assert done.logits is not None
        np.testing.assert_allclose(done.logits, ref_logits, atol=1e-5)
        state = await exported_state(engine, sid)
        assert int(state["carryover_step"]) == len(PROMPT) + 30
        for k, v in ref_state.items():
            np.testing.assert_allclose(state[k], v, atol=1e-5)
        # An empty prompt continues from the stored last prediction: the same as one longer run.
        more, done2 = await collect(engine, sid, GenerateCall("", max_tokens=10, temperature=0))
        ref_more, _, _ = offline_greedy(model, encode(model, PROMPT), 40)
        assert [e.token for e in more] == ref_more[30:] and done2.step == len(PROMPT) + 40


async def test_seeds_reproduce_and_sampling_consumes_every_token(
    redis_url: str, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["charlm"]
    async with running_engine(redis_url, {"charlm": model}) as engine:
        runs = []
        for seed in (7, 7, 8):
            sid = (await engine.create()).session_id
            call = GenerateCall(PROMPT, max_tokens=40, temperature=1.0, top_k=20, top_p=0.95, seed=seed)
            _, done = await collect(engine, sid, call)
            runs.append(done.tokens)
            # The session consumed prompt and tokens: its state is the offline run of both.
            state = await exported_state(engine, sid)
            ids = np.concatenate([encode(model, PROMPT), np.array(done.tokens, dtype=np.int64)])
            ref = model.run({"tokens": ids[None]}, np.ones((1, len(ids)), bool), model.contract.initial_states(1))
            for k, v in ref.states.items():
                np.testing.assert_allclose(state[k], v[0], atol=1e-5)
        assert runs[0] == runs[1] and runs[0] != runs[2]


async def test_stop_strings_and_validation(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["charlm"]
    async with running_engine(redis_url, {"charlm": model}, max_generate_tokens=50) as engine:
        sid = (await engine.create()).session_id
        events, done = await collect(
            engine, sid, GenerateCall("import os\nimport sys\n", max_tokens=50, temperature=0, stop=("\n",))
        )
        assert done.finish_reason == "stop" and done.text.endswith("\n") and "\n" not in done.text[:-1]
        assert done.step == len("import os\nimport sys\n") + len(events)
        with pytest.raises(InvalidInput, match="at most 50"):
            await engine.generate(sid, GenerateCall("a", max_tokens=51))
        with pytest.raises(InvalidInput, match="outside the vocab"):
            await engine.generate(sid, GenerateCall((1, 100_000), max_tokens=5))
        fresh = (await engine.create()).session_id
        with pytest.raises(InvalidInput, match="nothing since it was created"):
            await anext(aiter(await engine.generate(fresh, GenerateCall("", max_tokens=5))))
        with pytest.raises(StepConflict):  # the step rule: 409 before any token
            await anext(aiter(await engine.generate(sid, GenerateCall("a", max_tokens=5, expected_step=3))))
    bodies: list[dict[str, object]] = [
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -2},
        {"max_tokens": 0},
        {"prompt": {}},
        {"stop": [""]},
    ]
    for body in bodies:
        with pytest.raises(InvalidInput):
            parse_generate(body)
    with pytest.raises(InvalidInput, match="unknown field"):
        parse_generate({"promt": "a"})
    assert parse_generate({"prompt": [1, 2], "stop": "\n", "step": 4}) == GenerateCall(
        (1, 2), stop=("\n",), expected_step=4
    )


async def test_cancel_stops_at_a_token_boundary(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["charlm"]
    async with running_engine(redis_url, {"charlm": model}) as engine:
        sid = (await engine.create()).session_id
        stream = await engine.generate(sid, GenerateCall(PROMPT, max_tokens=1000, temperature=0))
        seen: list[TokenEvent] = []
        async for event in stream:
            if isinstance(event, DoneEvent):
                done = event
                break
            seen.append(event)
            if len(seen) == 5:
                stream.cancel()
        assert done.finish_reason == "cancelled" and list(done.tokens) == [e.token for e in seen]
        assert 5 <= len(seen) <= 7  # an iteration already in flight still lands (and is streamed)
        info = await engine.get(sid)
        assert info.step == done.step == len(PROMPT) + len(seen)
        ref_tokens, ref_state, _ = offline_greedy(model, encode(model, PROMPT), len(seen))
        assert ref_tokens == list(done.tokens)
        state = await exported_state(engine, sid)
        for k, v in ref_state.items():
            np.testing.assert_allclose(state[k], v, atol=1e-5)


async def test_generations_share_batches_with_steps(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["charlm"]
    async with running_engine(redis_url, {"charlm": model}) as engine:
        ids = [(await engine.create()).session_id for _ in range(17)]
        scheduler = engine.schedulers["charlm"]
        prompts = [PROMPT[: 5 + i] for i in range(16)]

        async def steps() -> list[np.ndarray]:
            await asyncio.sleep(0.05)
            return [(await engine.step(ids[16], {"tokens": encode(model, c)})).outputs["logits"] for c in ("ab", "c")]

        stepping = asyncio.ensure_future(steps())
        results = await asyncio.gather(
            *(
                collect(engine, sid, GenerateCall(p, max_tokens=20, temperature=0))
                for sid, p in zip(ids, prompts, strict=False)
            )
        )
        stepped = await stepping
        assert max(scheduler.generation_rows) > 1, "generations never shared a batch"
        for prompt, (_, done) in zip(prompts, results, strict=True):
            ref, _, _ = offline_greedy(model, encode(model, prompt), 20)
            assert list(done.tokens) == ref and done.step == len(prompt) + 20
        ref_out = model.run(
            {"tokens": encode(model, "abc")[None]}, np.ones((1, 3), bool), model.contract.initial_states(1)
        )
        np.testing.assert_allclose(np.concatenate(stepped), ref_out.outputs["logits"][0], atol=1e-5)


async def test_a_session_s_later_steps_wait_for_its_generation(
    redis_url: str, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["charlm"]
    async with running_engine(redis_url, {"charlm": model}) as engine:
        sid = (await engine.create()).session_id
        stream = await engine.generate(sid, GenerateCall("ab", max_tokens=15, temperature=0))
        later = asyncio.ensure_future(engine.step(sid, {"tokens": encode(model, "z")}))
        events = [e async for e in stream]
        done = events[-1]
        assert isinstance(done, DoneEvent)
        assert (await later).step == done.step + 1 == 2 + 15 + 1
