"""redis-py errors → StoreUnavailable, and only outages."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from service.errors import StoreUnavailable
from service.store.translate import is_unavailable_reply, translated, unavailable


@pytest.mark.parametrize(
    "reply",
    [ConnectionError("x"), TimeoutError("x"), ReadOnlyError("x"), ClusterDownError("x"), ResponseError("BUSY x")],
)
def test_outage_replies(reply: Exception) -> None:
    assert is_unavailable_reply(reply)


@pytest.mark.parametrize("reply", [ResponseError("ERR wrong number of arguments"), NoScriptError("x"), 1, b"ok"])
def test_other_replies_are_not_outages(reply: object) -> None:
    assert not is_unavailable_reply(reply)


def test_loading_asks_for_a_longer_retry() -> None:
    assert unavailable(BusyLoadingError("loading")).retry_after == 2.0
    assert unavailable(ConnectionError("down")).retry_after == 1.0


async def test_translated_raises_outages_as_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="ConnectionError"):
        async with translated():
            raise ConnectionError("refused")
    with pytest.raises(StoreUnavailable):
        async with translated():
            raise OSError("asyncio timeout")
    with pytest.raises(ResponseError, match="ERR bad"):  # a bad command is a bug, not an outage
        async with translated():
            raise ResponseError("ERR bad")
