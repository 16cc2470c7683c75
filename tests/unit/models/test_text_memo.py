"""The adapter's memo of chat-template renders and text encodings: bounded, and a caller that
changes what it was given never changes what the next caller gets."""

from PIL import Image

from vlmalign.data.schema import Message
from vlmalign.models import adapter_for, build_tiny
from vlmalign.models.adapter import _Memo


def test_the_memo_computes_once_per_key_and_evicts_the_oldest():
    calls = []
    memo = _Memo(2)
    f = lambda k: (lambda: calls.append(k) or k.upper())   # noqa: E731
    assert memo.get("a", f("a")) == "A" and memo.get("a", f("a")) == "A"
    memo.get("b", f("b"))
    memo.get("c", f("c"))          # evicts "a"
    memo.get("a", f("a"))
    assert calls == ["a", "b", "c", "a"]


def test_repeated_conversations_tokenize_alike_even_after_a_caller_edits_its_copy():
    ad = adapter_for(*build_tiny("llava"))
    img = ad.preprocess_image(Image.new("RGB", (32, 32), "red"))
    conv = [Message.user("What colour is it?", ), Message.assistant("red")]
    first = ad.tokenize_messages(conv, [])
    expected = (list(first.input_ids), list(first.labels))
    first.input_ids[:] = [0] * len(first.input_ids)      # a caller that edits in place
    first.labels[:] = [0] * len(first.labels)
    again = ad.tokenize_messages(conv, [])
    assert (again.input_ids, again.labels) == expected
    # the placeholder expansion is shared too, and edits to one image's list leave the next alone
    img.expansion[:] = []
    assert ad.preprocess_image(Image.new("RGB", (32, 32), "blue")).expansion
