"""Commands sent straight on a pooled redis-py connection: the store's hot path to one Redis.

redis-py's ``execute_command`` and ``pipeline().execute()`` wrap every call in pool bookkeeping
(a condition lock, a timeout, a socket poll for stale data, connection-time metrics) and a
retry helper; on an idle server that was more than the round trip itself (a 3 KB SET: 78 µs vs
33 µs sent this way; docs/bench/README.md). Here a few connections stay checked out of the
pool, parked between calls, and each call writes its packed commands and reads the replies on
one of them: the same connection class (hiredis packing and parsing), timeout (one deadline
for the whole call) and ``Retry`` as the pool's. Not for a cluster (redis-py routes those by slot).

A parked connection never holds an unread reply: any failure or cancellation between the write
and the last read disconnects it (the pool's stale-data poll guards against exactly that). A
retry after a dropped connection re-sends the commands on a fresh one, as redis-py does; the
store's scripts are safe to re-send (the write token).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ResponseError

PARKED = 4  # connections kept out of the pool between calls, at most a quarter of the pool's


class DirectCommands:
    """``call`` one command or ``pipeline`` several in one round trip on a parked connection."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._parked: deque[AbstractConnection] = deque()
        # The rest serve redis-py's own calls and callers beyond the parked ones: the pool never
        # runs dry while connections idle here.
        self._park_at_most = min(PARKED, pool.max_connections // 4)
        self._timeout: float | None = pool.connection_kwargs.get("socket_timeout")

    async def call(self, *args: Any) -> Any:
        """One command's reply; an error reply is raised (``ResponseError``), as redis-py does."""
        [reply] = await self.pipeline([args])
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Every command's reply in order, an error reply as its ``ResponseError`` in its place
        (redis-py's ``execute(raise_on_error=False)``); connection failures are raised."""
        connection = self._parked.pop() if self._parked else await self._pool.get_connection()  # type: ignore[no-untyped-call]
        # One deadline for the write and all the replies, instead of redis-py's per-operation ones
        # (its timed write is an ``asyncio.wait_for``: a task per call). While the connection is
        # ours it has no socket timeout of its own; it gets it back before the pool sees it again.
        timeout, connection.socket_timeout = self._timeout, None
        try:

            async def send_and_read() -> list[Any]:
                async with asyncio.timeout(timeout):
                    await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
                    replies: list[Any] = []
                    for _ in commands:
                        try:
                            replies.append(await connection.read_response())
                        except ResponseError as e:
                            replies.append(e)
                    return replies

            async def drop(_: Exception) -> None:
                await connection.disconnect()

            assert connection.retry is not None
            replies = await connection.retry.call_with_retry(send_and_read, drop)
        except BaseException:  # the connection may hold unread replies: never reuse it as it is
            connection.socket_timeout = timeout
            await connection.disconnect()
            await self._pool.release(connection)
            raise
        if len(self._parked) < self._park_at_most:
            self._parked.append(connection)
        else:
            connection.socket_timeout = timeout
            await self._pool.release(connection)
        return replies
