from __future__ import annotations

import pytest

from csulora.errors import InputError
from csulora.training.data import IGNORE_INDEX, chat_prompt_ids, load_pairs, response_ids, tokenize_pairs


def test_load_pairs_validates_fields_with_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "response": "r", "extra": 1}\n\n')
    assert load_pairs(good) == [{"prompt": "p", "response": "r", "extra": 1}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: missing or non-string field 'response'"):
        load_pairs(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(InputError, match=r"broken\.jsonl:1: not valid JSON"):
        load_pairs(broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="empty file"):
        load_pairs(empty)
    with pytest.raises(InputError, match="no such"):
        load_pairs(tmp_path / "missing.jsonl")


def test_tokenize_pairs_masks_the_prompt(tiny_tokenizer):
    pairs = [{"prompt": "What is tea?", "response": "Sure. Start with the basics."}]
    (ex,) = tokenize_pairs(tiny_tokenizer, pairs, max_length=128)
    head = chat_prompt_ids(tiny_tokenizer, "What is tea?")
    tail = response_ids(tiny_tokenizer, "Sure. Start with the basics.")
    assert ex["input_ids"] == head + tail
    assert ex["labels"] == [IGNORE_INDEX] * len(head) + tail
    assert ex["labels"][-1] == tiny_tokenizer.eos_token_id
    assert ex["attention_mask"] == [1] * len(head + tail)


def test_tokenize_pairs_truncates_but_keeps_a_response_token(tiny_tokenizer):
    pairs = [{"prompt": "word " * 50, "response": "answer " * 50}]
    (ex,) = tokenize_pairs(tiny_tokenizer, pairs, max_length=16)
    assert len(ex["input_ids"]) == 16
    assert any(label != IGNORE_INDEX for label in ex["labels"])
