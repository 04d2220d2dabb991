"""The one rule for each session request field that every transport shares: session ids, ``step``
and ``ttl_s`` (``service.sessions`` applies them; the OpenAPI schemas state them)."""

from __future__ import annotations

import re

from service.engine.validation import integral
from service.errors import InvalidInput

# One rule for every session id, chosen at create or named in a path: URL-safe without escaping.
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$")
SESSION_ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ ~ - starting with a letter or digit"
MAX_TTL_S = 366 * 86_400


def is_session_id(value: object) -> bool:
    """Whether ``value`` follows the session id rule; a path id that does not is simply absent."""
    return isinstance(value, str) and SESSION_ID.match(value) is not None


def checked_step(value: object) -> int | None:
    """The ``step`` of a request: ``None`` (arrival order) or a non-negative int (``bool`` is not;
    ``3.0`` is 3)."""
    value = integral(value)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise InvalidInput(f"'step' must be a non-negative integer, not {value!r:.40}")


def checked_ttl(value: object, default: int) -> int:
    """Seconds without access before a session expires: an int in [1, ``MAX_TTL_S``]."""
    value = integral(value)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TTL_S:
        return value
    raise InvalidInput(f"ttl_s must be an integer number of seconds between 1 and {MAX_TTL_S}")
