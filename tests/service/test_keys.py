from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.keys import ApiKey, KeyFileError, KeyRing, hash_key, key_line, new_key, parse_key_file


def test_a_key_line_authenticates_its_key_and_no_other(tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    assert alice != bob and alice.startswith("co_") and len(alice) > 40
    path = tmp_path / "keys"
    path.write_text(f"# team keys\n\n{key_line('alice', alice)}\n{key_line('bob', bob)}  # laptop\n")
    ring = KeyRing(path)
    assert len(ring) == 2
    found = ring.authenticate(alice)
    assert found == ApiKey("alice", hash_key(alice))
    assert found is not None and found.owner == hash_key(alice)[:32]
    assert ring.authenticate(bob) is not None and ring.authenticate(bob) != found
    assert ring.authenticate("co_wrong") is None
    assert ring.authenticate(hash_key(alice)) is None  # the stored hash is not a key


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("alice", "no hash"),
        ("alice:1234", "short hash"),
        (":" + "a" * 64, "no name"),
        ("al ice:" + "a" * 64, "space in the name"),
        ("alice:" + "g" * 64, "not hex"),
    ],
)
def test_a_malformed_line_is_named(line: str, why: str) -> None:
    with pytest.raises(KeyFileError, match="line 2"):
        parse_key_file(f"ok:{'b' * 64}\n{line}\n")


def test_uppercase_hex_is_accepted() -> None:
    assert list(parse_key_file("ok:" + "AB" * 32)) == ["ab" * 32]


def test_start_fails_on_a_missing_empty_or_bad_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot load"):
        KeyRing(tmp_path / "absent")
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(KeyFileError, match="no keys"):
        KeyRing(tmp_path / "empty")
    (tmp_path / "bad").write_text("nope\n")
    with pytest.raises(KeyFileError, match="line 1"):
        KeyRing(tmp_path / "bad")


def test_an_edited_file_is_reloaded_and_a_broken_edit_keeps_the_last_good_keys(tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    path = tmp_path / "keys"
    path.write_text(key_line("svc", old) + "\n")
    ring = KeyRing(path, check_interval_s=0.0)
    assert ring.authenticate(old) and not ring.authenticate(new)

    path.write_text(key_line("svc", new) + "\n")  # rotation: the old key stops working
    os.utime(path, ns=(1, 1))  # a different mtime even within one clock tick
    assert ring.authenticate(new) and not ring.authenticate(old)

    path.write_text("garbage\n")
    os.utime(path, ns=(2, 2))
    assert ring.authenticate(new), "a broken edit must not lock every client out"

    path.unlink()
    assert ring.authenticate(new)


def test_reload_is_checked_at_most_once_per_interval(tmp_path: Path) -> None:
    first, second = new_key(), new_key()
    path = tmp_path / "keys"
    path.write_text(key_line("a", first) + "\n")
    ring = KeyRing(path, check_interval_s=3600)
    path.write_text(key_line("a", first) + "\n" + key_line("b", second) + "\n")
    assert ring.authenticate(second) is None  # not re-read yet
    ring.reload()  # what SIGHUP does
    assert ring.authenticate(second) is not None


def test_key_names_are_checked() -> None:
    with pytest.raises(KeyFileError, match="key name"):
        key_line("has:colon", new_key())
