"""A multi-round chat with one model: the conversation, each image encoded once, one streamed
generation per user turn. The terminal chat (``vlmalign chat``) and the web demo
(``vlmalign webui``) both hold their conversations in a :class:`ChatSession`."""

from __future__ import annotations

import sys

from ..data.images import DEFAULT_MAX_PIXELS


class ChatSession:
    """Conversation state + one streamed generation per user turn (images encoded once each).
    A turn that fails or is interrupted leaves the conversation as it was before it."""

    # how a user shows an image, for the error that refuses a typed image placeholder
    image_hint = "with /image PATH"

    def __init__(self, adapter, image_root=None, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                 image_position="before", max_pixels=DEFAULT_MAX_PIXELS):
        from ..data.batching import ImageLoader
        self.ad = adapter
        self.loader = ImageLoader(adapter, image_root, max_pixels=max_pixels)
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.image_position = image_position
        self.reset()

    def reset(self):
        self._current = None
        self.messages = []
        self.pending = []
        self.encoded = {}

    def add_image(self, path: str):
        import os

        from ..data.schema import ImageRef
        from ..errors import VlmalignError
        if not path:
            raise VlmalignError("usage: /image PATH")
        self.add_ref(ImageRef(path=os.path.abspath(os.path.expanduser(path))))

    def add_ref(self, ref):
        """Show the image ``ref`` (a path under the image root, or bytes) with the next message."""
        self.loader.pil(ref)  # fail now, clearly, if it is missing, corrupt or over the pixel budget
        self.pending.append(ref)

    def message(self, text: str):
        """The user turn ``text`` makes with the pending images, placed as the model expects."""
        from ..data.schema import Message
        from ..errors import VlmalignError
        token = self.ad.placeholder_token
        if token in text:
            raise VlmalignError(f"{token} in a message is this model's image placeholder: show an image "
                                f"{self.image_hint} instead (nothing was sent; the conversation is kept)")
        parts = (*self.pending, text) if self.image_position == "before" else (text, *self.pending)
        return Message.user(*parts)

    def ask(self, text: str, out=sys.stdout) -> str:
        import torch

        from ..data.schema import Message
        msg = self.message(text)
        msgs = [*self.messages, msg]
        self._current = msg
        try:
            refs = [im for m in msgs for im in m.images]
            inputs = [self.loader.inputs(r) for r in refs]
            t = self.ad.tokenize_prompt(msgs, inputs)
            enc = self._features(refs, inputs)
            ids = torch.tensor([t.input_ids], device=self.ad.device)
            mask = torch.ones_like(ids)
            tok = self.ad.tokenizer
            streamer = _Streamer(tok, out)
            sample = self.temperature > 0
            with torch.no_grad():
                gen = self.ad.generate(ids, mask, encoded=enc, image_indices=[list(range(len(refs)))],
                                       max_new_tokens=self.max_new_tokens, do_sample=sample,
                                       temperature=self.temperature if sample else None,
                                       top_p=self.top_p if sample else None,
                                       top_k=(self.top_k or None) if sample else None, streamer=streamer,
                                       pad_token_id=tok.pad_token_id, eos_token_id=self.ad.stop_token_ids())
        finally:
            self._current = None
        answer = tok.decode(self.ad.new_tokens(gen, ids)[0], skip_special_tokens=True).strip()
        self.pending = []
        self.messages = [*msgs, Message.assistant(answer)]
        return answer

    def _holders(self):
        """For each image of the conversation so far, the message that shows it."""
        msgs = [*self.messages, self._current] if self._current is not None else self.messages
        return [m for m in msgs for _ in m.images]

    def _features(self, refs, inputs):
        """EncodedImages for ``refs``; each image is encoded once per session and reused."""
        import torch

        from ..models.adapter import EncodedImages
        if not refs:
            return None
        new = [(r, x, m) for r, x, m in zip(refs, inputs, self._holders()) if r.key() not in self.encoded]
        if new:
            enc = self.ad.encode_images([x for _, x, _ in new], prompts=[[m] for _, _, m in new])
            for i, (r, _, _) in enumerate(new):
                self.encoded[r.key()] = (enc.features[i], {k: v[i:i + 1] for k, v in enc.extras.items()})
        feats = [self.encoded[r.key()][0] for r in refs]
        keys = self.encoded[refs[0].key()][1].keys()
        extras = {k: torch.cat([self.encoded[r.key()][1][k] for r in refs]) for k in keys}
        return EncodedImages(feats, extras)


class _Streamer:
    """Prints decoded text as tokens arrive (skips the prompt)."""

    def __init__(self, tok, out):
        from transformers import TextStreamer
        self._s = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        self._s.on_finalized_text = lambda text, stream_end=False: (out.write(text + ("\n" if stream_end else "")),
                                                                    out.flush())

    def put(self, value):
        self._s.put(value)

    def end(self):
        self._s.end()
