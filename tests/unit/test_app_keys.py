"""The key file store: parsing, matching, and rotation driven by a fake clock (no sleeps)."""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

import pytest

from app.edge.access import MAX_KEY_BYTES, KeyFile, KeyFileError, parse_keys
from app.edge.requests import Priority, Rate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_parse_skips_blank_lines_and_comments_and_strips_whitespace() -> None:
    text = "# team a\nalpha-key-1\n\n   \n  beta-key-2  \n#gamma\nalpha-key-1\r\n"
    assert list(parse_keys(text, "f")) == [b"alpha-key-1", b"beta-key-2"]


def test_a_key_may_name_its_caller_class_and_weight() -> None:
    keys = parse_keys("one-key name=mobile weight=3\ntwo-key\nthree-key weight=2\n", "f")
    one, two, three = keys.values()
    assert (one.label, one.weight) == ("mobile", 3)
    assert (two.label, two.weight) == ("unnamed", 1)
    assert (three.label, three.weight) == ("unnamed", 2)
    # Each key is a caller of its own, whatever its name; its identity never shows the key.
    assert len({one.identity, two.identity, three.identity}) == 3
    assert not any(key.decode() in who.identity for key, who in keys.items())


def test_a_key_may_set_its_priority_and_rate_limit() -> None:
    text = "a priority=high rate=2.5\nb rate=10 burst=40 priority=LOW\nc rate=0.2\nd\n"
    a, b, c, d = parse_keys(text, "f").values()
    assert (a.priority, a.rate) == (Priority.HIGH, Rate(2.5, 3))  # a second's worth, rounded up
    assert (b.priority, b.rate) == (Priority.LOW, Rate(10.0, 40))
    assert c.rate == Rate(0.2, 1)  # never under one request
    assert (d.priority, d.rate) == (Priority.NORMAL, None)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "holds no keys"),
        ("# only a comment\n\n", "holds no keys"),
        ("ok-key\n" + "k" * (MAX_KEY_BYTES + 1) + "\n", f"line 2: key longer than {MAX_KEY_BYTES}"),
        ("two words\n", "line 1: after the key only name=, weight=, priority=, rate= and burst="),
        ("clé\n", "line 1: key has a character that is not visible ASCII"),
        ("k name=two words\n", "line 1: after the key only"),
        ("k name=a name=b\n", "line 1: after the key only"),
        ("k name=a/b\n", "line 1: name must be"),
        ("k weight=0\n", "line 1: weight must be a whole number from 1 to 100"),
        ("k weight=1.5\n", "line 1: weight must be"),
        ("k weight=101\n", "line 1: weight must be"),
        ("k priority=urgent\n", "line 1: priority must be high, normal or low"),
        ("k rate=0\n", "line 1: rate must be requests per second"),
        ("k rate=nan\n", "line 1: rate must be"),
        ("k rate=fast\n", "line 1: rate must be"),
        ("k burst=5\n", "line 1: burst= needs a rate="),
        ("k rate=5 burst=0\n", "line 1: burst must be a whole number"),
        ("k rate=5 burst=2.5\n", "line 1: burst must be"),
    ],
    ids=[
        "empty",
        "comments-only",
        "too-long",
        "inner-space",
        "non-ascii",
        "name-with-space",
        "name-twice",
        "name-slash",
        "weight-zero",
        "weight-fraction",
        "weight-too-big",
        "priority-unknown",
        "rate-zero",
        "rate-nan",
        "rate-word",
        "burst-alone",
        "burst-zero",
        "burst-fraction",
    ],
)
def test_parse_refuses_unusable_files_naming_the_line_not_the_key(text: str, fragment: str) -> None:
    with pytest.raises(KeyFileError, match=fragment) as raised:
        parse_keys(text, "f")
    assert "two words" not in str(raised.value)
    assert "clé" not in str(raised.value)


def test_missing_or_undecodable_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read the api key file"):
        KeyFile(tmp_path / "absent", "api")
    binary = tmp_path / "binary"
    binary.write_bytes(b"key-\xff\xfe\n")
    with pytest.raises(KeyFileError, match="is not UTF-8 text"):
        KeyFile(binary, "api")


def test_matches_each_key_exactly(tmp_path: Path) -> None:
    keys = KeyFile(write(tmp_path / "keys", "first-key\nsecond-key\n"), "api")
    assert keys.count == 2
    assert keys.match(b"first-key")
    assert keys.match(b"second-key")
    for wrong in (b"first-ke", b"first-key2", b"FIRST-KEY", b"first-key\n", b"x"):
        assert not keys.match(wrong), wrong


def test_logs_the_count_never_a_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.edge.access"):
        KeyFile(write(tmp_path / "keys", "secret-one\nsecret-two\n"), "metrics")
    (record,) = caplog.records
    assert record.getMessage() == "api keys loaded"
    assert (record.__dict__["key_set"], record.__dict__["keys"]) == ("metrics", 2)
    assert "secret" not in caplog.text


def test_a_changed_file_is_read_at_the_first_check_after_the_interval(tmp_path: Path) -> None:
    clock = Clock()
    path = write(tmp_path / "keys", "old-key\n")
    keys = KeyFile(path, "api", check_interval_s=1.0, clock=clock)
    write(path, "new-key-longer\n")
    clock.now += 0.5
    assert keys.match(b"old-key")  # not looked at yet: at most one stat per interval
    clock.now += 0.5
    assert keys.match(b"new-key-longer")
    assert not keys.match(b"old-key")


def test_a_same_size_rewrite_is_seen_by_its_mtime(tmp_path: Path) -> None:
    clock = Clock()
    path = write(tmp_path / "keys", "key-aaaa\n")
    keys = KeyFile(path, "api", check_interval_s=1.0, clock=clock)
    write(path, "key-bbbb\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    clock.now += 1.0
    assert keys.match(b"key-bbbb")


def test_a_swapped_symlink_is_seen_as_kubernetes_updates_a_secret(tmp_path: Path) -> None:
    clock = Clock()
    write(tmp_path / "v1", "version-one\n")
    write(tmp_path / "v2", "version-two\n")
    link = tmp_path / "keys"
    link.symlink_to(tmp_path / "v1")
    keys = KeyFile(link, "api", check_interval_s=1.0, clock=clock)
    staged = tmp_path / "keys.new"
    staged.symlink_to(tmp_path / "v2")
    staged.replace(link)
    clock.now += 1.0
    assert keys.match(b"version-two")
    assert not keys.match(b"version-one")


@pytest.mark.parametrize("damage", ["emptied", "deleted", "comments-only"])
def test_an_unusable_rewrite_keeps_the_current_keys_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    clock = Clock()
    path = write(tmp_path / "keys", "kept-key\n")
    keys = KeyFile(path, "api", check_interval_s=1.0, clock=clock)
    if damage == "deleted":
        path.unlink()
    else:
        write(path, "" if damage == "emptied" else "# rotating\n")
    with caplog.at_level(logging.WARNING, logger="app.edge.access"):
        for _ in range(3):
            clock.now += 1.0
            assert keys.match(b"kept-key")
    assert [r.getMessage() for r in caplog.records] == [
        "api keys not reloaded; the previous keys stay in use"
    ]
    write(path, "next-key\n")
    clock.now += 1.0
    assert keys.match(b"next-key")
    assert not keys.match(b"kept-key")


def test_reload_reads_now_without_waiting_for_the_interval(tmp_path: Path) -> None:
    clock = Clock()
    path = write(tmp_path / "keys", "before\n")
    keys = KeyFile(path, "api", check_interval_s=1.0, clock=clock)
    write(path, "after-reload\n")
    keys.reload()
    assert keys.match(b"after-reload")
    assert not keys.match(b"before")


def test_every_key_is_compared_with_compare_digest_even_after_a_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = KeyFile(write(tmp_path / "keys", "first\nsecond\nthird\n"), "api")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert keys.match(b"first")
    # Digests of one length: the comparison's time does not depend on the key's length.
    assert len(calls) == 3
    assert {len(a) for a, _ in calls} | {len(b) for _, b in calls} == {32}
