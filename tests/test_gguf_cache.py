"""The bundled GGUF's conversion cache: keyed by package version and file hash, written whole or not at all,
and (slow) bit-identical to converting the GGUF on every load."""

from __future__ import annotations

import json

import pytest

from tickettune.pipeline import gguf_cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / gguf_cache.BUNDLED_GGUF).write_bytes(b"GGUF v1")
    monkeypatch.setattr(gguf_cache, "bundled_model_dir", lambda: folder)
    return folder / gguf_cache.BUNDLED_GGUF


def test_the_cache_folder_is_keyed_by_the_files_hash(fake_gguf, tmp_path):
    first, sha = gguf_cache.cache_folder(tmp_path / "cache")
    assert len(sha) == 64 and first.name.endswith(sha[:16]) and first.name.startswith("smollm2-135m-")
    fake_gguf.write_bytes(b"GGUF v2")  # another file: another folder, never a stale conversion
    second, sha2 = gguf_cache.cache_folder(tmp_path / "cache")
    assert sha2 != sha and second != first


def test_a_folder_without_its_marker_or_with_another_hash_is_not_complete(tmp_path):
    folder = tmp_path / "conv"
    folder.mkdir()
    assert not gguf_cache.is_complete(folder, "abc")
    (folder / gguf_cache.MARKER).write_text(json.dumps({"gguf_sha256": "other"}))
    assert not gguf_cache.is_complete(folder, "abc")
    (folder / gguf_cache.MARKER).write_text("not json")
    assert not gguf_cache.is_complete(folder, "abc")
    (folder / gguf_cache.MARKER).write_text(json.dumps({"gguf_sha256": "abc"}))
    assert gguf_cache.is_complete(folder, "abc")


def test_an_unwritable_cache_falls_back_to_converting(fake_gguf, tmp_path, monkeypatch, caplog):
    class Saved:
        def save_pretrained(self, folder, **kwargs):
            raise PermissionError(13, "read-only file system")

    monkeypatch.setattr(gguf_cache, "convert", lambda kwargs: (Saved(), Saved()))
    assert gguf_cache.converted({}, tmp_path / "cache") is None
    assert "converting on every load" in caplog.text
    assert not list((tmp_path / "cache").iterdir())  # no half folder left behind


@pytest.mark.slow
def test_the_cached_conversion_loads_the_same_tensors_and_is_made_once(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs, made = {"dtype": torch.float32}, []
    convert = gguf_cache.convert
    monkeypatch.setattr(gguf_cache, "convert", lambda kw: made.append(convert(kw)) or made[-1])
    folder = gguf_cache.converted(kwargs, tmp_path)  # converts once (kept in `made`), saves, renames into place
    [(direct, direct_tok)] = made
    monkeypatch.setattr(gguf_cache, "convert", lambda kw: pytest.fail("converted again"))
    assert gguf_cache.converted(kwargs, tmp_path) == folder  # the second load reads the cache
    cached = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
    cached_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    a, b = direct.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "My invoice for März shows two seats <|im_end|>"
    assert direct_tok(text)["input_ids"] == cached_tok(text)["input_ids"]
    assert direct_tok.chat_template == cached_tok.chat_template
