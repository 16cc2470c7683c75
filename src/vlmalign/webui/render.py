"""A conversation as a Gradio Chatbot shows it: a list of ``{"role", "content"}`` messages whose
content is the text, or a list of the text and ``{"path": FILE}`` for each image shown."""

from __future__ import annotations

from ..data.schema import ImagePart, Message


def history(messages: list[Message], shown: dict[str, str], pending: Message | None = None,
            answer: str | None = None) -> list[dict]:
    """``messages`` (then the message being answered and the answer so far) as Chatbot messages;
    ``shown`` maps an image's key to the file the page shows it from."""
    out = [_entry(m, shown) for m in (*messages, *([pending] if pending is not None else []))]
    if pending is not None and answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out


def _entry(m: Message, shown: dict[str, str]) -> dict:
    parts = []
    for p in m.content:
        if isinstance(p, ImagePart):
            path = shown.get(p.image.key())
            parts.append({"path": path} if path else "(image)")
        elif p.text:
            parts.append(p.text)
    if not parts or (len(parts) == 1 and isinstance(parts[0], str)):
        return {"role": m.role, "content": parts[0] if parts else ""}
    return {"role": m.role, "content": parts}
