"""Chunk texts of the Python API (issue #27): "" until a character completes, so they join."""

from __future__ import annotations


def test_chunk_texts_join_into_the_result(runtime):
    # Random byte-level tokens: a chunk often ends inside a multi-byte character.
    stream = runtime.stream([1, 2], alg="ar", max_new_tokens=24)
    chunks = list(stream)
    assert any(c.token_ids and c.text == "" for c in chunks)
    assert "".join(c.text for c in chunks) == stream.result().text
