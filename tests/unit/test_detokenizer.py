import pytest

from common.modeling.loader import load_tokenizer
from services.gateway.detokenizer import Detokenizer

TEXTS = [
    "Hello, world! This is a test of streaming detokenization.",
    "Emoji 😀 and 👩‍👩‍👧 family, café, naïve, 你好世界, 日本語のテキスト.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "def f(x):\n    return x ** 2  # code ✓",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(tok, ids: list[int], stop: tuple[str, ...] = (), step: int = 1) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tok, stop)
    pieces = [detok.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_streamed_text_equals_full_decode(tok, text, step):
    ids = encode(tok, text)
    pieces, _ = stream(tok, ids, step=step)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)


def test_special_tokens_are_skipped(tok):
    ids = [tok.bos_token_id, *encode(tok, "Hi there"), tok.eos_token_id]
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == "Hi there"


def test_multibyte_characters_never_split(tok):
    text = "😀你好🎉世界👍"
    ids = encode(tok, text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the tokens do split characters
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens add no text yet


def test_stop_string_spanning_tokens_cuts_before_it(tok):
    ids = encode(tok, "Hello world STOP here and more")
    assert "STOP" not in [tok.decode([i]) for i in ids]  # spans several tokens
    pieces, detok = stream(tok, ids, stop=(" STOP",))
    assert "".join(pieces) == "Hello world"
    assert detok.stopped
    assert pieces[-1] == ""


def test_nothing_after_stop(tok):
    detok = Detokenizer(tok, ("END",))
    out = detok.add(encode(tok, "abc END def"))
    assert out == "abc " and detok.stopped
    assert detok.add(encode(tok, " more text")) == ""
    assert detok.flush() == ""


def test_earliest_stop_string_wins(tok):
    pieces, detok = stream(tok, encode(tok, "one two three four"), stop=("four", "two"))
    assert "".join(pieces) == "one " and detok.stopped


def test_possible_stop_prefix_is_held_then_released(tok):
    detok = Detokenizer(tok, ("STOP",))
    shown = detok.add(encode(tok, "Go ST"))
    assert shown == "Go " and not detok.stopped  # "ST" could be the start of STOP
    assert detok.add(encode(tok, "ART now")) == "START now"  # it was not
    assert not detok.stopped
    assert detok.flush() == ""


def test_flush_releases_held_text(tok):
    detok = Detokenizer(tok, ("\n\nUser:",))
    shown = detok.add(encode(tok, "The answer is 4.\n\nUs"))
    assert shown == "The answer is 4."
    assert detok.flush() == "\n\nUs"
    assert not detok.stopped


@pytest.mark.parametrize("text", TEXTS)
def test_stop_cut_matches_reference(tok, text):
    stop = text[len(text) // 2:len(text) // 2 + 3]
    pieces, detok = stream(tok, encode(tok, text), stop=(stop, "never-there"))
    assert "".join(pieces) == text[:text.find(stop)]
    assert detok.stopped
    assert not any("\ufffd" in p for p in pieces)


def test_no_stop_strings_emit_everything_at_once(tok):
    detok = Detokenizer(tok)
    assert detok.add(encode(tok, "plain text ST")) == "plain text ST"
    assert detok.flush() == ""


def test_flush_releases_a_trailing_replacement_character(tok):
    ids = encode(tok, "abc \ufffd")
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "abc \ufffd"
