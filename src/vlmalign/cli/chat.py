"""`vlmalign chat`: multi-round terminal chat with streamed output."""

from __future__ import annotations

import sys

from ..config import with_defaults
from ..rollout.generate import SamplingConfig
from .args import config_flags
from .generate import SAMPLING, add_model_args, load_for_inference

ChatSampling = with_defaults(SamplingConfig, "ChatSampling", max_new_tokens=256)

COMMANDS = {
    "/image": "/image PATH   show an image with your next message",
    "/reset": "/reset        forget the conversation (and pending images)",
    "/help": "/help         this help",
    "/quit": "/quit         leave (Ctrl-D works too; Ctrl-C stops an answer or clears the line)",
}
HELP = "commands:\n" + "\n".join(f"  {v}" for v in COMMANDS.values()) + \
    "\n  (start a message with // to send text that begins with /)"


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streamed output)")
    add_model_args(p)
    p.add_argument("--image", help="image to start the conversation with")
    p.add_argument("--image-root", default=None, help="directory images must lie in (default: anywhere "
                                                      "under the current directory)")
    p.add_argument("--image-position", choices=("auto", "before", "after"), default="auto",
                   help="where a message's images go relative to its text; auto: as in the prompts the model "
                        "was trained on (its vlmalign_prompt.json), else before")
    config_flags(p, ChatSampling, SAMPLING)
    p.set_defaults(func=_run)


class ChatSession:
    """Conversation state + one streamed generation per user turn (images encoded once each).
    A turn that fails or is interrupted leaves the conversation as it was before it."""

    def __init__(self, adapter, image_root=None, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                 image_position="before"):
        from ..data.batching import ImageLoader
        self.ad = adapter
        self.loader = ImageLoader(adapter, image_root)
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
        ref = ImageRef(path=os.path.abspath(os.path.expanduser(path)))
        self.loader.pil(ref)  # fail now, clearly, if it is missing or corrupt
        self.pending.append(ref)

    def message(self, text: str):
        """The user turn ``text`` makes with the pending images, placed as the model expects."""
        from ..data.schema import Message
        from ..errors import VlmalignError
        token = self.ad.placeholder_token
        if token in text:
            raise VlmalignError(f"{token} in a message is this model's image placeholder: show an image with "
                                "/image PATH instead (nothing was sent; the conversation is kept)")
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


def _run(args) -> int:
    from ..models.prompt_layout import model_image_position
    ad = load_for_inference(args)
    position = model_image_position(args.model) if args.image_position == "auto" else args.image_position
    s = ChatSession(ad, args.image_root, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                    image_position=position)
    if args.image:
        s.add_image(args.image)
    print(f"vlmalign chat ({ad.family}; images go {position} your text). /help for commands.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-C: line cleared; /quit or Ctrl-D leaves)")
            continue
        if line and not _command(s, line):
            _turn(s, line[1:] if line.startswith("//") else line)
        if line in ("/quit", "/exit"):
            return 0


def _command(s: ChatSession, line: str) -> bool:
    """Run ``line`` if it is a command (True), or say it is none; False: a message to send."""
    import difflib

    from ..errors import VlmalignError
    if not line.startswith("/") or line.startswith("//"):
        return False
    name, _, rest = line.partition(" ")
    if name in ("/quit", "/exit"):
        return True
    if name == "/help":
        print(HELP)
    elif name == "/reset":
        s.reset()
        print("(conversation reset)")
    elif name == "/image":
        try:
            s.add_image(rest.strip())
            print(f"(image {rest.strip()} will be shown with your next message)")
        except VlmalignError as e:
            print(f"error: {e}")
    else:
        close = difflib.get_close_matches(name, [*COMMANDS, "/exit"], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"unknown command {name}{hint}: nothing was sent; /help lists the commands, "
              "// starts a message with /")
    return True


def _turn(s: ChatSession, text: str) -> None:
    from ..errors import VlmalignError
    print("model> ", end="", flush=True)
    try:
        s.ask(text)
    except VlmalignError as e:
        print(f"\nerror: {e}")
    except KeyboardInterrupt:
        print("\n(answer stopped; the conversation is as before that message)")
