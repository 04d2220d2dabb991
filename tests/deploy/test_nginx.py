"""docker/nginx.conf: the load balancer's directives, and its syntax checked by a real nginx
where one is installed (``apt-get install nginx-light``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from service.config import Settings
from tests.deploy.files import NGINX_CONF, nginx_directives, nginx_size_bytes

UPSTREAM = ("http", "upstream carryover")
SERVER = ("http", "server")
STREAMS = (*SERVER, "location ~ ^/v1/(stream|sessions/[^/]+/(stream|generate))$")
DIRECTIVES = nginx_directives(NGINX_CONF.read_text())


def args(name: str, block: tuple[str, ...]) -> list[list[str]]:
    return [a for n, b, a in DIRECTIVES if n == name and b == block]


def test_upstream_is_least_connections_over_every_replica() -> None:
    assert args("least_conn", UPSTREAM) == [[]]
    assert args("server", UPSTREAM) == [["api:8000", "resolve"]]  # re-resolved: replicas come and go
    assert args("zone", UPSTREAM)  # `resolve` needs a shared zone
    assert args("resolver", ("http",))[0][0] == "127.0.0.11"  # Docker's DNS
    assert not args("ip_hash", UPSTREAM) and not args("hash", UPSTREAM) and not args("sticky", UPSTREAM)


def test_websocket_upgrade_headers() -> None:
    assert args("proxy_http_version", SERVER) == [["1.1"]]
    headers = dict((a[0], a[1]) for a in args("proxy_set_header", SERVER))
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == "$connection_upgrade"
    maps = [b for n, b, _ in DIRECTIVES if b and b[-1] == "map $http_upgrade $connection_upgrade"]
    assert maps, "the Connection header comes from a map over $http_upgrade"
    assert args("default", maps[0]) == [["upgrade"]]


def test_streams_get_long_timeouts_and_no_buffering() -> None:
    assert args("proxy_buffering", SERVER) == [["off"]]  # server-sent events flow as produced
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = args(name, STREAMS)
        assert value[0].endswith("s") and int(value[0][:-1]) >= 3600
    pattern = re.compile(STREAMS[-1].removeprefix("location ~ "))
    for path in ("/v1/stream", "/v1/sessions/abc_-1/stream", "/v1/sessions/abc/generate"):
        assert pattern.match(path), path
    assert not pattern.match("/v1/sessions/abc/step")
    assert args("proxy_pass", STREAMS) == args("proxy_pass", (*SERVER, "location /")) == [["http://carryover"]]


def test_body_limit_equals_the_service_limit() -> None:
    (limit,) = args("client_max_body_size", ("http",))
    assert nginx_size_bytes(limit[0]) == Settings.model_fields["max_body_bytes"].default


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light): syntax check skipped")
    text = NGINX_CONF.read_text()
    # The compose service name does not resolve here, and `resolve` needs nginx >= 1.27.3.
    local = text.replace("server api:8000 resolve;", "server 127.0.0.1:8000;")
    assert local != text
    conf = tmp_path / "nginx.conf"
    conf.write_text(local)
    result = subprocess.run(
        [nginx, "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
