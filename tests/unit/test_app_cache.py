"""The answer cache's keys, budget and least-recently-used order (app.pipeline.cache)."""

from __future__ import annotations

import numpy as np

from app.pipeline.cache import (
    ENTRY_OVERHEAD,
    AnswerCache,
    Seen,
    answer_bytes,
    decode_answer,
    encode_answer,
)
from app.pipeline.heads import Explained, Heatmap, Ranked
from app.telemetry.metrics import Metrics


def test_keys_differ_by_bytes_version_and_head() -> None:
    key = AnswerCache.key
    one = key(b"image", ("m", "1"), ("classify", 5))
    assert one == key(b"image", ("m", "1"), ("classify", 5))
    assert one != key(b"imagf", ("m", "1"), ("classify", 5))
    assert one != key(b"image", ("m", "2"), ("classify", 5))
    assert one != key(b"image", ("m", "1"), ("classify", 4))


def test_the_least_recently_used_go_first_and_the_budget_holds() -> None:
    answer = np.zeros(100, dtype=np.float32)  # 400 bytes of buffer
    size = answer_bytes(answer) + ENTRY_OVERHEAD
    cache = AnswerCache(4 * size, Metrics())
    for name in ("a", "b", "c", "d"):
        cache.put(name, answer)
    assert cache.get("a") is answer  # "a" is now the most recent
    cache.put("e", answer)
    assert cache.get("b") is None  # the least recently used went
    kept = {k for k in ("a", "c", "d", "e") if cache.get(k) is not None}
    assert kept == {"a", "c", "d", "e"}
    assert cache.bytes == 4 * size
    cache.put("big", np.zeros(2_000, dtype=np.float32))  # over a quarter: never kept
    assert cache.get("big") is None
    assert len(cache) == 4


def test_answers_are_sized_by_what_they_hold() -> None:
    ranked = [Ranked("seven", 7, 0.9)] * 5
    assert 500 < answer_bytes(ranked) < 1500
    assert answer_bytes(np.zeros(2048, dtype=np.float32)) > 8192
    assert answer_bytes({"probabilities": np.zeros(1000, dtype=np.float32)}) > 4000


def test_a_request_says_hit_miss_or_partial() -> None:
    assert Seen().header is None
    assert Seen(hits=2).header == "hit"
    assert Seen(misses=1).header == "miss"
    assert Seen(hits=1, misses=1).header == "partial"


def test_shared_answers_come_back_as_they_went_and_nothing_else_does() -> None:
    ranked = [Ranked("cat", 3, 0.75), Ranked("dog", 1, 0.25)]
    explained = Explained(ranked, Heatmap(3, "cat", 16, 12, "iVBOR"))
    embedding = np.arange(6, dtype=np.float32).reshape(2, 3)
    rows = {"probabilities": np.array([0.25, 0.75], dtype=np.float32)}
    for answer in (ranked, explained):
        assert decode_answer(encode_answer(answer)) == answer
    back = decode_answer(encode_answer(embedding))
    assert back.dtype == np.float32
    assert np.array_equal(back, embedding)
    probabilities = decode_answer(encode_answer(rows))["probabilities"]
    assert np.array_equal(probabilities, rows["probabilities"])
    assert isinstance(decode_answer(encode_answer(explained)).heatmap, Heatmap)
    # Whatever else Redis holds is a miss: no object arrays, no other classes, no pickles.
    for foreign in (
        b'{"array": ["|O", [1], "AAAA"]}',
        b'{"tuple": ["Popen", ["sh"]]}',
        b'{"other": 1}',
        b"\x80\x04K\x01.",
        b"not json",
    ):
        assert decode_answer(foreign) is None, foreign
