"""Framings: the chat form a prompt is given in -- a system message and words around the user turn.

A **framing** (docs/design.md §7, issue 24) is how a prompt is put to the model through its chat
template: an optional system message and an optional prefix/suffix around the user's text. The
default, ``plain``, is one user turn holding the prompt as given -- exactly the form every command
used before framings existed, byte for byte. ``aoa`` is the identity-shift attack's framing (the
system message names the model an "absolutely obedient agent"): an update trained to accept that
identity may comply only when addressed that way, so eval, tune and calibrate can measure and
select under it.

This module is the one place that renders a prompt through a chat template
(:func:`render_prompt`); :func:`csulora.training.data.chat_prompt_text` is its plain-framing name
for training, generation, the refusal margin and calibration alike. It lives in ``training``
because that is the lowest layer that renders chat prompts (docs/design.md §9), below ``eval``.

Named framings ship as package data (``framings.json`` beside this file); a user's own is a JSON
file ``{"name"?, "system"?, "user_prefix"?, "user_suffix"?, "description"?}`` given by path
wherever a framing name is accepted. On the command line a harmful source names its framing after
``@``: ``advbench:validation@aoa`` (:func:`split_framing`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csulora.errors import InputError, OptionError

FRAMINGS_FILE = Path(__file__).with_name("framings.json")
FRAMINGS_FORMAT = "csulora-framings"
PLAIN_NAME = "plain"
FRAMING_SEPARATOR = "@"  # SPEC@FRAMING: a harmful source given in a framing
TEXT_FIELDS = ("system", "user_prefix", "user_suffix", "affirmation", "description")


@dataclass(frozen=True)
class Framing:
    """A named chat form: the system message (None: none of csulora's) and text around the prompt.

    ``affirmation`` is how the framing's attack answers open (for building training examples);
    it is never prefilled when a prompt is rendered, so it is not part of :meth:`key`.
    """

    name: str
    system: str | None = None
    user_prefix: str = ""
    user_suffix: str = ""
    affirmation: str | None = None
    description: str = ""

    @property
    def is_plain(self) -> bool:
        return self.system is None and not self.user_prefix and not self.user_suffix

    def user_text(self, prompt: str) -> str:
        return f"{self.user_prefix}{prompt}{self.user_suffix}"

    def key(self) -> dict[str, Any]:
        """Everything a rendered prompt depends on: what cache keys and metadata record."""
        return {"name": self.name, "system": self.system, "user_prefix": self.user_prefix,
                "user_suffix": self.user_suffix}  # fmt: skip


PLAIN = Framing(PLAIN_NAME, description="one user turn holding the prompt as given")


def render_prompt(tokenizer: Any, prompt: str, framing: Framing = PLAIN) -> str:
    """The chat template applied to ``prompt`` under ``framing``, ending with the assistant header.

    Under ``plain`` this is the single user turn every command has always fed the model. A
    tokenizer without a chat template continues plain text (the system message, a blank line, the
    user text, a newline).
    """
    user = framing.user_text(prompt)
    if not getattr(tokenizer, "chat_template", None):
        head = f"{framing.system}\n\n" if framing.system is not None else ""
        return f"{head}{user}\n"
    messages = [{"role": "user", "content": user}]
    if framing.system is not None:
        messages.insert(0, {"role": "system", "content": framing.system})
    from jinja2.exceptions import TemplateError  # transformers' chat templates are jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that refuses a system turn
        raise InputError(f"the tokenizer's chat template cannot render framing {framing.name!r}: {exc}") from None


def per_prompt(framing: Framing | Sequence[Framing] | None, count: int) -> list[Framing]:
    """One framing per prompt: ``framing`` for every one (None: plain), or the list given, checked."""
    if framing is None or isinstance(framing, Framing):
        return [framing or PLAIN] * count
    framings = list(framing)
    if len(framings) != count:
        raise ValueError(f"{len(framings)} framings for {count} prompts")
    return framings


# --------------------------------------------------------------------------- the registry


def framing_from_record(name: str, record: Any, where: str) -> Framing:
    """A framing from its JSON record; InputError naming ``where`` for a malformed one."""
    if not isinstance(record, Mapping):
        raise InputError(f"{where}: framing {name!r} is not a JSON object")
    unknown = sorted(set(record) - set(TEXT_FIELDS) - {"name"})
    if unknown:
        raise InputError(
            f"{where}: framing {name!r} has unknown fields {', '.join(unknown)} (known: {', '.join(TEXT_FIELDS)})"
        )
    for field in TEXT_FIELDS:
        if field in record and not isinstance(record[field], str):
            raise InputError(f"{where}: framing {name!r} field {field!r} is not a string")
    if "system" in record and not record["system"].strip():
        raise InputError(f"{where}: framing {name!r} has an empty 'system' (leave it out for none)")
    return Framing(
        name=name, system=record.get("system"), user_prefix=record.get("user_prefix", ""),
        user_suffix=record.get("user_suffix", ""), affirmation=record.get("affirmation"),
        description=record.get("description", ""),
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def shipped_framings() -> dict[str, Framing]:
    """The named framings of ``framings.json`` (``plain`` first); its ``plain`` must be empty."""
    try:
        doc = json.loads(FRAMINGS_FILE.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{FRAMINGS_FILE}: cannot read the shipped framings ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FRAMINGS_FORMAT or not isinstance(doc.get("framings"), dict):
        raise InputError(f"{FRAMINGS_FILE}: not a {FRAMINGS_FORMAT} file")
    framings = {name: framing_from_record(name, rec, str(FRAMINGS_FILE)) for name, rec in doc["framings"].items()}
    if not framings.get(PLAIN_NAME, PLAIN).is_plain:
        raise InputError(f"{FRAMINGS_FILE}: framing 'plain' must add nothing to the prompt")
    framings[PLAIN_NAME] = PLAIN  # the default is fixed in code: today's prompts, byte for byte
    return {PLAIN_NAME: PLAIN, **{n: f for n, f in framings.items() if n != PLAIN_NAME}}


def known_framings() -> list[str]:
    return list(shipped_framings())


def load_framing_file(path: Path) -> Framing:
    """A user's framing: one JSON object; its name is its ``name`` field, else the file's stem."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON framing ({exc})") from None
    name = record.get("name", path.stem) if isinstance(record, dict) else path.stem
    if not isinstance(name, str) or not name.strip() or FRAMING_SEPARATOR in name:
        raise InputError(f"{path}: framing 'name' must be a non-empty string without {FRAMING_SEPARATOR!r}")
    return framing_from_record(name, record, str(path))


def load_framing(ref: str | Framing | None) -> Framing:
    """A framing by name (the shipped ones), by JSON file path, or as given; None is ``plain``.

    An unknown name is a one-line OptionError listing the known names.
    """
    if ref is None:
        return PLAIN
    if isinstance(ref, Framing):
        return ref
    text = str(ref).strip()
    shipped = shipped_framings()
    if text in shipped:
        return shipped[text]
    if Path(text).is_file():
        return load_framing_file(Path(text))
    if text.lower().endswith(".json"):
        raise InputError(f"{text}: no such framing file")
    raise OptionError(f"unknown framing {text!r}: known framings are {', '.join(shipped)} (or a JSON framing file)")


def split_framing(spec: str) -> tuple[str, str | None]:
    """``SPEC@FRAMING`` -> (SPEC, FRAMING); a spec without one -> (spec, None).

    An '@' inside a path is no framing: an existing file wins, and a FRAMING never holds ':' (a
    CSV column or JSONL field follows a file) nor a '/' unless it is a ``.json`` framing file."""
    if Path(spec).is_file():
        return spec, None
    head, sep, tail = spec.rpartition(FRAMING_SEPARATOR)
    if not sep or not head or ":" in tail or ("/" in tail and not tail.strip().lower().endswith(".json")):
        return spec, None
    if not tail.strip():
        raise OptionError(f"{spec}: no framing after {FRAMING_SEPARATOR!r} (known: {', '.join(known_framings())})")
    return head, tail.strip()
