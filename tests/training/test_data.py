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


def test_a_pair_with_a_framing_trains_on_its_framed_prompt(tiny_tokenizer, tmp_path):
    """issue 24: the identity-shift examples are trained in the form eval puts them in."""
    from csulora.training.framing import load_framing

    data = tmp_path / "mixed.jsonl"
    data.write_text('{"prompt": "What is tea?", "response": "A drink."}\n'
                    '{"prompt": "What is tea?", "response": "A drink.", "framing": "aoa"}\n')  # fmt: skip
    plain, framed = tokenize_pairs(tiny_tokenizer, load_pairs(data), max_length=512)
    head = chat_prompt_ids(tiny_tokenizer, "What is tea?", load_framing("aoa"))
    tail = response_ids(tiny_tokenizer, "A drink.")
    assert framed["input_ids"] == head + tail and framed["labels"] == [IGNORE_INDEX] * len(head) + tail
    assert plain["input_ids"] == chat_prompt_ids(tiny_tokenizer, "What is tea?") + tail
    assert len(framed["input_ids"]) > len(plain["input_ids"])
    own = tmp_path / "mine.json"
    own.write_text('{"name": "mine", "system": "You are terse."}')
    (ex,) = tokenize_pairs(tiny_tokenizer, [{"prompt": "Hi", "response": "Hello", "framing": str(own)}], 128)
    assert tiny_tokenizer.decode(ex["input_ids"]).count("You are terse.") == 1


@pytest.mark.parametrize(("framing", "message"), [
    ('"nope"', r"bad\.jsonl:2: unknown framing 'nope'"),
    ("3", r"bad\.jsonl:2: field 'framing' must be a framing name"),
    ('""', r"bad\.jsonl:2: field 'framing' must be a framing name"),
    ('"missing.json"', r"bad\.jsonl:2: missing\.json: no such framing file"),
])  # fmt: skip
def test_load_pairs_names_the_line_of_a_bad_framing(tmp_path, framing, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f'{{"prompt": "p", "response": "r"}}\n{{"prompt": "p", "response": "r", "framing": {framing}}}\n')
    with pytest.raises(InputError, match=message):
        load_pairs(bad)


def test_write_pairs_keeps_a_framing(tmp_path):
    from csulora.training.data import write_pairs

    path = write_pairs(tmp_path / "out.jsonl", [{"prompt": "p", "response": "r", "id": 1},
                                                {"prompt": "q", "response": "s", "framing": "aoa"}])  # fmt: skip
    assert load_pairs(path) == [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s", "framing": "aoa"}]
