"""Container health check: exit 0 when this replica's ``/readyz`` answers 200, else 1.

Standard library only (the slim images have no curl). The URL defaults to
``http://127.0.0.1:$CARRYOVER_PORT/readyz``; a first argument replaces it.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    """Probe readiness; print why on failure (Docker keeps the output in ``docker inspect``)."""
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{os.environ.get('CARRYOVER_PORT', '8000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
            return 0 if reply.status == 200 else 1
    except OSError as e:  # refused, timed out, or HTTPError (503 while starting, draining or Redis down)
        print(f"not ready: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
