"""The Gradio page of ``vlmalign webui``: the chat panes (one per model, side by side), an image
upload, the message box, Send / Stop / Reset, the sampling settings. :class:`Page` holds the
callbacks as plain methods (tests call them without a browser); :func:`launch` serves the page on
this machine only unless told otherwise, never through a public share link."""

from __future__ import annotations

import os
from typing import Iterator

from ..errors import VlmalignError
from .conversation import Conversation, Update, WebChat
from .uploads import list_images, pick_image

MAX_UPLOAD = "64mb"          # an upload larger than this is refused by the server
MAX_NEW_TOKENS_SLIDER = 2048


def require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no calls home from a local demo
    try:
        import gradio as gr
    except ImportError:
        raise VlmalignError("the web demo needs Gradio: pip install 'vlmalign[webui]'") from None
    return gr


class Page:
    """The page's callbacks over a :class:`WebChat`; each returns the values of the page's outputs."""

    def __init__(self, chat: WebChat):
        self.chat = chat
        self.images = list_images(chat.image_root)

    def start(self) -> Conversation:
        return self.chat.conversation()

    def send(self, conv: Conversation | None, text, image, temperature, top_p, max_new_tokens) -> Iterator[tuple]:
        """Outputs: each pane's history, the message box, the image, the status line."""
        if conv is None:   # the page's load event has not run yet
            yield self._outputs(Update([[] for _ in self.chat.models], "the page is still loading: send again"))
            return
        for update in conv.send(text, image, temperature, top_p, max_new_tokens):
            yield self._outputs(update)

    def stop(self, conv: Conversation | None) -> None:
        if conv is not None:
            conv.stop()

    def reset(self, conv: Conversation | None) -> tuple:
        if conv is None:
            return self._outputs(Update([[] for _ in self.chat.models], "conversation reset"), clear=True)
        return self._outputs(conv.reset(), clear=True)

    def pick(self, rel: str | None) -> tuple:
        """Outputs: the image, the status line."""
        gr = require_gradio()
        if not rel:
            return gr.skip(), ""
        try:
            return pick_image(self.chat.image_root, rel, self.chat.max_pixels), ""
        except VlmalignError as e:
            return gr.skip(), f"error: {e}"

    def _outputs(self, u: Update, clear: bool = False) -> tuple:
        gr = require_gradio()
        cleared = clear or u.sent
        return (*u.histories, "" if cleared else gr.skip(), None if cleared else gr.skip(), u.status)

    def build(self):
        """The page as a ``gradio.Blocks``."""
        gr = require_gradio()
        s = self.chat.sampling
        names = [m.name for m in self.chat.models]
        with gr.Blocks(title="vlmalign webui") as demo:
            gr.Markdown("### vlmalign webui: " + (f"`{names[0]}`" if len(names) == 1 else
                                                 " and ".join(f"`{n}`" for n in names) + " side by side"))
            state = gr.State(None)
            with gr.Row():
                panes = [gr.Chatbot(label=n, elem_id=f"chat-{i}", render_markdown=False, height=420,
                                    buttons=["copy", "copy_all"]) for i, n in enumerate(names)]
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="filepath", format="png", sources=["upload"], elem_id="image",
                                     label="image (sent with your next message)", height=240)
                    if self.images:
                        picker = gr.Dropdown(self.images, value=None, label="or one under --image-root",
                                             elem_id="pick")
                with gr.Column(scale=2):
                    text = gr.Textbox(label="message", lines=2, elem_id="message",
                                      placeholder="Ask about the image (Enter sends, Shift+Enter: new line)")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", elem_id="stop")
                        reset = gr.Button("Reset", elem_id="reset")
                    status = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="status")
                    with gr.Accordion("sampling", open=False):
                        temperature = gr.Slider(0, 2, value=s.temperature, step=0.05, elem_id="temperature",
                                                label="temperature (0: greedy)")
                        top_p = gr.Slider(0.05, 1, value=s.top_p, step=0.05, label="top_p", elem_id="top-p")
                        max_new = gr.Slider(1, max(MAX_NEW_TOKENS_SLIDER, s.max_new_tokens), step=1,
                                            value=s.max_new_tokens, label="max new tokens", elem_id="max-new")
            outputs = [*panes, text, image, status]
            inputs = [state, text, image, temperature, top_p, max_new]
            for trigger in (send.click, text.submit):   # one answer at a time, whichever tab asks
                trigger(self.send, inputs, outputs, concurrency_id="model", concurrency_limit=1)
            stop.click(self.stop, [state], None)
            for clear in (reset.click, *(pane.clear for pane in panes)):   # a pane's bin icon resets too
                clear(self.reset, [state], outputs)
            if self.images:
                picker.change(self.pick, [picker], [image, status])
            demo.load(self.start, None, state)
        return demo


def launch(chat: WebChat, host: str = "127.0.0.1", port: int = 7860):
    """Serve the page at http://HOST:PORT in a background thread (never through a share link) and
    return the running ``gradio.Blocks``: ``.local_url``, ``.block_thread()``, ``.close()``."""
    demo = Page(chat).build()
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                    max_file_size=MAX_UPLOAD, ssr_mode=False, prevent_thread_lock=True, quiet=True)
    except OSError as e:   # the port is taken, the address is not this machine's ...
        raise VlmalignError(f"cannot serve on {host}:{port}: {e}") from None
    return demo
