"""Stock processors without their video processor, for image-only use.

Several processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL) require a video processor, which
needs torchvision (not installed with vlmalign). A subclass with :class:`ImageOnlyMixin` first has
the same image handling, placeholder expansion and chat template, and saves as a normal processor
directory (tokenizer files, processor_config.json, chat_template.jinja). ProcessorMixin takes the
sub-processors from the ``__init__`` signature: here image_processor and tokenizer only. Extra
keyword arguments (e.g. InternVL's ``image_seq_length``) pass through.
"""

from __future__ import annotations


class ImageOnlyMixin:
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
