"""A small byte-level BPE tokenizer built offline, for tiny test and demo models.

Real VLM tokenizers are large downloads; tiny models need one that (a) is built here in well
under a second, (b) carries a family's special tokens (image placeholder, turn markers) as
single tokens, and (c) encodes ShapesWorld text in few tokens, so a tiny model learns fast.
The merges are learned from a fixed embedded corpus, so the result is deterministic.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Words that the demo data and chat templates use; repeated so BPE learns whole-word merges.
_CORPUS_WORDS = """
a an the is are in of and or to on at with there image picture photo describe what which
where how many colour color shape object objects left right top bottom middle center centre
red green blue yellow purple orange black white gray grey pink brown cyan magenta
circle square triangle cross star diamond rectangle ellipse
one two three four five six seven eight nine zero yes no
question answer user assistant system human gpt you your please
this that it its has have not do does any some only all
is there a in the image ? . , ! : ; ' " ( ) - \n
0 1 2 3 4 5 6 7 8 9 the best response better worse score
a red circle in the top left and a blue square in the bottom right
""".split()
_CORPUS = [" ".join(_CORPUS_WORDS)] * 20 + [
    "A red circle in the top left and a blue square in the bottom right.",
    "How many objects are there in the image? Answer with a number.",
    "What colour is the circle? What shape is in the top right?",
    "Is there a green triangle in the image? yes no",
    "Describe the image. There is a yellow cross in the bottom left.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]
# The chat templates' role words and the questions' first words as the templates render them
# (``USER: What ...? ASSISTANT: red</s>USER: ...``, ``User:...<end_of_utterance>\nAssistant:``), so
# each becomes one token: spelled out letter by letter they made up about half of a ShapesWorld
# VQA sequence. Each line starts a role word, so no merge joins a space to USER / User / Assistant.
_CORPUS += [line for _ in range(20) for line in (
    "USER: What colour is it? ASSISTANT: red", "USER: Where is it? ASSISTANT: top left",
    "USER: How many? ASSISTANT: 2", "USER: Is there one? ASSISTANT: no", "USER: Describe the image.",
    "User: What is it?", "Assistant: yes", "What", "Where", "How", "Is", "Describe")]


def build_tiny_tokenizer(
    special_tokens: list[str],
    *,
    vocab_size: int = 640,
    bos_token: str | None = None,
    eos_token: str = "</s>",
    pad_token: str | None = None,
    unk_token: str | None = None,
    chat_template: str | None = None,
    extra_attrs: dict | None = None,
    padding_side: str = "right",
    named_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on the embedded corpus and wrap it for transformers.

    ``special_tokens`` are added as single, never-split special tokens (order fixes their ids,
    which come right after the learned vocabulary). bos/eos/pad/unk must be among them or are
    appended. ``named_tokens`` (e.g. ``{"image_token": "<img>"}``) become tokenizer attributes
    (``tok.image_token``, ``tok.image_token_id``) that survive saving, as processors expect. The tokenizer adds no BOS/EOS by itself: chat templates place them, as the real
    families' templates do.
    """
    specials: list[str] = []
    for tok in [*special_tokens, bos_token, eos_token, pad_token, unk_token]:
        if tok is not None and tok not in specials:
            specials.append(tok)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token,
        pad_token=pad_token if pad_token is not None else eos_token, unk_token=unk_token,
        padding_side=padding_side, **({"extra_special_tokens": named_tokens} if named_tokens else {}),
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    for k, v in (extra_attrs or {}).items():
        setattr(fast, k, v)
    return fast
