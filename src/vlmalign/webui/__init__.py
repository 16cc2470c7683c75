"""``vlmalign webui``: a Gradio page to chat with a model, or two side by side, about images
(docs/WEBUI.md). :mod:`.conversation` is the page's logic without Gradio, :mod:`.app` the page."""

from .conversation import ChatModel, Conversation, Update, WebChat

__all__ = ["ChatModel", "Conversation", "Update", "WebChat"]
