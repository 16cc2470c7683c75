"""`vlmalign chat`: multi-round terminal chat with streamed output."""

from __future__ import annotations

import sys

from .generate import add_model_args, load_for_inference

HELP = """commands:
  /image PATH   show an image with your next message
  /reset        forget the conversation (and pending images)
  /help         this help
  /quit         leave (Ctrl-D works too)"""


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streamed output)")
    add_model_args(p)
    p.add_argument("--image", help="image to start the conversation with")
    p.add_argument("--image-root", default=None, help="directory images must lie in (default: anywhere "
                                                      "under the current directory)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.set_defaults(func=_run)


class ChatSession:
    """Conversation state + one streamed generation per user turn (images encoded once each)."""

    def __init__(self, adapter, image_root=None, max_new_tokens=256, temperature=0.0, top_p=1.0):
        from ..data.batching import ImageLoader
        self.ad = adapter
        self.loader = ImageLoader(adapter, image_root)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.reset()

    def reset(self):
        self._current = None
        self.messages = []
        self.pending = []
        self.encoded = {}

    def add_image(self, path: str):
        import os

        from ..data.schema import ImageRef
        ref = ImageRef(path=os.path.abspath(path))
        self.loader.pil(ref)  # fail now, clearly, if it is missing or corrupt
        self.pending.append(ref)

    def ask(self, text: str, out=sys.stdout) -> str:
        import torch

        from ..data.schema import Message
        msg = Message.user(*self.pending, text)
        self.pending = []
        msgs = [*self.messages, msg]
        self._current = msg
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
                                   top_p=self.top_p if sample else None, top_k=None, streamer=streamer,
                                   pad_token_id=tok.pad_token_id, eos_token_id=self.ad.stop_token_ids())
        answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
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


def _run(args) -> int:
    from ..errors import VlmalignError
    ad = load_for_inference(args)
    s = ChatSession(ad, args.image_root, args.max_new_tokens, args.temperature, args.top_p)
    if args.image:
        s.add_image(args.image)
    print(f"vlmalign chat ({ad.family}). /help for commands.")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/help":
            print(HELP)
            continue
        if line == "/reset":
            s.reset()
            print("(conversation reset)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                s.add_image(path)
                print(f"(image {path} will be shown with your next message)")
            except VlmalignError as e:
                print(f"error: {e}")
            continue
        print("model> ", end="", flush=True)
        s.ask(line)
