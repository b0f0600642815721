import pytest
import torch

from dormant.llm.text import load_text, make_windows


class _Tok:
    """A character tokenizer; with ``bos`` it adds token 1 at the start like Llama tokenizers do."""

    def __init__(self, bos: bool):
        self.bos_token_id = 1 if bos else None
        self._bos = bos

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + ord(c) % 50 for c in text]
        if add_special_tokens and self._bos:
            ids = [1] + ids
        return type("E", (), {"input_ids": ids})()


def test_wikitext_rows_are_joined_the_gptq_way():
    text = load_text("wikitext2-test")
    # HF rows ["", " = Robert Boulter = \n", "", " Robert Boulter is ...", ...] joined with "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")


def test_windows_without_bos_are_the_stream_cut_in_pieces():
    w = make_windows(_Tok(False), "abcdefghij", 4)
    assert w.ids.shape == (2, 4) and not w.bos
    assert w.ids.flatten().tolist() == _Tok(False)("abcdefgh").input_ids


def test_windows_with_bos_start_each_window_with_it():
    w = make_windows(_Tok(True), "abcdefghij", 4, skip=1)
    assert w.bos and w.ids[:, 0].eq(1).all()
    assert w.ids.shape == (2, 4)  # 10 chars -> 3 windows of 3 text tokens, the first skipped
    assert w.ids[0, 1:].tolist() == _Tok(False)("def").input_ids


def test_bad_arguments():
    with pytest.raises(ValueError, match="cannot skip"):
        make_windows(_Tok(False), "abc", 2, skip=1)
    with pytest.raises(ValueError, match="no BOS"):
        make_windows(_Tok(False), "abcdef", 2, bos="always")
    with pytest.raises(FileNotFoundError, match="neither a known corpus"):
        load_text("/nonexistent/file.txt")


def test_max_windows():
    w = make_windows(_Tok(False), "x" * 100, 10, max_windows=3)
    assert w.ids.shape == (3, 10) and w.ids.dtype == torch.long
