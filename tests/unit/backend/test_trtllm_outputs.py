"""Streamed TensorRT-LLM outputs as engine updates."""

from __future__ import annotations

from types import SimpleNamespace

from backend.engine.trtllm.outputs import OutputView, read_output, to_update
from backend.scheduler.updates import RequestUpdate

EOS = 128009


def view(
    *tokens: int,
    finished: bool = False,
    reason: str | None = None,
    stop_reason: int | str | None = None,
    cached: int = 0,
) -> OutputView:
    return OutputView(tuple(tokens), finished, reason, stop_reason, cached)


def updates(
    views: list[OutputView], stop_ids: frozenset[int] = frozenset({EOS})
) -> list[RequestUpdate]:
    seen = 0
    out: list[RequestUpdate] = []
    for v in views:
        update = to_update("r1", v, num_seen=seen, num_prompt_tokens=12, stop_token_ids=stop_ids)
        seen += len(update.new_token_ids)
        out.append(update)
    return out


def test_streamed_outputs_become_deltas_ending_on_eos() -> None:
    got = updates(
        [
            view(791, cached=8),
            view(791, 6864, 374, cached=8),
            view(791, 6864, 374, 12366, EOS, finished=True, reason="stop", cached=8),
        ]
    )
    assert got == [
        RequestUpdate("r1", [791], False, None, 12, 8),
        RequestUpdate("r1", [6864, 374], False, None, 12, 8),
        RequestUpdate("r1", [12366, EOS], True, "stop", 12, 8, stop_token_id=EOS),
    ]
    # The stop token counts as generated but is not printed.
    assert got[-1].printable_token_ids == [12366]


def test_finish_at_max_tokens_is_length() -> None:
    got = updates([view(5, 6), view(5, 6, 7, finished=True, reason="length")])
    assert got[-1] == RequestUpdate("r1", [7], True, "length", 12, 0)


def test_eos_excluded_by_the_engine_still_finishes_with_stop() -> None:
    got = updates([view(5), view(5, 6, finished=True, reason="stop")])
    assert got[-1] == RequestUpdate("r1", [6], True, "stop", 12, 0)
    assert got[-1].printable_token_ids == [6]


def test_stop_string_keeps_its_tokens_for_the_serving_layer_to_cut() -> None:
    got = updates([view(10, 11, 12, finished=True, reason="stop", stop_reason="\n\n")])
    assert got[-1] == RequestUpdate("r1", [10, 11, 12], True, "stop", 12, 0)


def test_cancelled_and_timed_out_are_aborts() -> None:
    assert updates([view(1, finished=True, reason="cancelled")])[-1].finish_reason == "abort"
    assert updates([view(finished=True, reason="timeout")])[-1].finish_reason == "abort"


def test_final_output_without_new_tokens() -> None:
    got = updates([view(3, 4), view(3, 4, finished=True, reason="length")])
    assert got[-1] == RequestUpdate("r1", [], True, "length", 12, 0)


def test_token_ids_that_shrink_never_repeat_tokens() -> None:
    got = updates([view(3, 4, 5), view(3, 4, finished=True, reason="stop")])
    assert got[-1].new_token_ids == []


def test_read_output_from_a_request_output() -> None:
    completion = SimpleNamespace(
        index=0,
        text="",
        token_ids=[791, 6864],
        finish_reason="stop",
        stop_reason=EOS,
    )
    result = SimpleNamespace(outputs=[completion], finished=True, cached_tokens=64)
    assert read_output(result) == OutputView((791, 6864), True, "stop", EOS, 64)


def test_read_output_before_cached_tokens_existed() -> None:
    completion = SimpleNamespace(token_ids=None, finish_reason=None, stop_reason=None)
    result = SimpleNamespace(outputs=[completion], finished=False)
    assert read_output(result) == OutputView((), False, None, None, 0)
