"""Parity of our SFT with TRL 1.16's ``SFTTrainer`` on a tiny LLaVA and ShapesWorld records.

What is compared (fp32, CPU, the same random-init weights on both sides):

* **Batches.** TRL's own vision collator (``DataCollatorForVisionLanguageModeling``, built by
  ``SFTTrainer``) turns the records into ``input_ids`` / ``attention_mask`` / ``labels`` /
  ``pixel_values``. Our pipeline (``load_examples`` with ``tokenize_record``, exactly as
  ``train_sft`` does, then ``SFTCollator``) turns the same LLaVA-JSON file into a ``Batch``.
* **Loss.** ``SFTTrainer.compute_loss(model, inputs, num_items_in_batch=n)`` (TRL's fused LM
  head: ``-sum(log p(label)) / n`` over labels != -100, shifted by one) against
  ``SFTMethod(adapter).compute_loss(batch, n)`` on a ``Batch`` holding TRL's very token ids,
  mask and labels, with the images preprocessed and encoded by our adapter (``mm_encoder_outputs``).
  ``n`` is the local token count (TRL's ``num_items_in_batch=None``) and a larger "global" count
  (what both trainers pass under gradient accumulation / several processes).
* **Gradients** of every parameter after ``backward()`` of each loss (<= 1e-5 absolute).
* The comparison can fail: a per-sequence mean, or our loss with a count off by one, differ
  from TRL's number by far more than the tolerance.

Three ways of building the labels:

1. Prompt-completion records (TRL's default ``completion_only_loss``) with the tiny LLaVA's
   template, which renders BOS and ends each answer with EOS: TRL's tensors and ours are
   **identical** (ids, mask, labels, pixels), so are the losses and gradients.
2. Conversational records with ``assistant_only_loss=True`` (multi-turn), with the tiny template
   plus ``{% generation %}`` markers around each answer and its EOS: ids identical; labels
   identical except one documented token: where the tokenizer keeps the space after
   ``"ASSISTANT:"`` as a token of its own (the tiny BPE has no ``" A"`` merge, so captions
   ``"A green ..."`` tokenize as ``" ", "A", ...``), we supervise that space token and TRL does
   not. Ours supervises everything the model must generate after the generation prompt
   ``"ASSISTANT:"`` (which is what ``generate`` continues from); TRL's mask starts at the first
   character inside ``{% generation %}``. Where the space merges with the first word
   (``" red"``, ``" 1"``) the labels are equal.
3. The llava-hf ``chat_template.json`` of llava-1.5 / llava-v1.6-vicuna (``{% generation %}``
   around ``content + ' '``, no EOS anywhere): TRL supervises, per turn, the answer tokens and
   the trailing ``" "`` token, and **no EOS** (TRL warns that the model may not learn to stop).
   We insert EOS after every answer (``VLMAdapter._ensure_eos``): our ids are TRL's ids with
   one EOS added after each answer; our labels are the answer plus EOS. Losses still agree on
   TRL's tensors, and multi-turn records get EOS after every answer (a test below; this
   once failed because later turns' spans were not shifted by earlier insertions).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig as TRLSFTConfig  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from vlmalign.config.sections import DataSection  # noqa: E402
from vlmalign.data.batching import IGNORE_INDEX, Batch, SFTCollator  # noqa: E402
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld  # noqa: E402
from vlmalign.data.loading import load_examples  # noqa: E402
from vlmalign.methods.sft import SFTMethod# noqa: E402
from vlmalign.models import adapter_for, build_tiny  # noqa: E402
from vlmalign.models.llava import LLAVA_CHAT_TEMPLATE  # noqa: E402

TOL = 1e-5

# chat_template.json shipped with llava-hf/llava-1.5-*-hf and llava-v1.6-vicuna-*-hf
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr("
    "'type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _with_generation_markers(template: str) -> str:
    """The tiny LLaVA template with ``{% generation %}`` around each answer's text and its EOS."""
    out = template.replace(
        "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}",
        "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% elif message['role'] == 'assistant' %}"
        "{% generation %}{{ c['text'] }}{% endgeneration %}{% else %}{{ c['text'] }}{% endif %}")
    out = out.replace(
        "{% if message['role'] == 'assistant' %}{{ eos_token }}",
        "{% if message['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}")
    assert out.count("{% generation %}") == 2, "the tiny LLaVA template changed; update this test"
    return out


TEMPLATES = {"tiny": LLAVA_CHAT_TEMPLATE, "tiny+markers": _with_generation_markers(LLAVA_CHAT_TEMPLATE),
             "llava-hf": LLAVA_HF_TEMPLATE}


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ShapesWorld files plus two small LLaVA-JSON training files picked from them:
    ``single.json`` (single-turn VQA + a caption; two records share an image) and
    ``multi.json`` (two three-turn VQA records + a caption)."""
    root = tmp_path_factory.mktemp("parity")
    generate_shapesworld(root, ShapesConfig(seed=1, train_images=4, eval_images=2))
    vqa = json.loads((root / "vqa_train.json").read_text())
    caps = json.loads((root / "captions_train.json").read_text())
    single = [r for r in vqa if len(r["conversations"]) == 2][:3] + caps[:1]
    # the caption answer starts with a word the tiny BPE has no merge for with the space before
    # it (" Yes" -> "Ġ", "Y", "es"): a lone-space token right after "ASSISTANT:"
    cap = json.loads(json.dumps(caps[1]))
    cap["conversations"][1]["value"] = "Yes, " + cap["conversations"][1]["value"]
    multi = [r for r in vqa if len(r["conversations"]) >= 6][:2] + [cap]
    assert len(single) == 4 and len(multi) == 3
    assert len({r["image"] for r in single}) < len(single)  # a shared image: encoded once by us
    (root / "single.json").write_text(json.dumps(single))
    (root / "multi.json").write_text(json.dumps(multi))
    return root


def _trl_examples(root: Path, name: str, style: str) -> list[dict]:
    """The same records as TRL datasets take them (images before the first user text, as
    LLaVA's ``<image>\\n`` prefix and TRL's ``prepare_multimodal_messages`` both place them)."""
    out = []
    for r in json.loads((root / name).read_text()):
        msgs = [{"role": {"human": "user", "gpt": "assistant"}[c["from"]],
                 "content": c["value"].replace("<image>\n", "")} for c in r["conversations"]]
        img = Image.open(root / r["image"]).convert("RGB")
        if style == "prompt_completion":
            out.append({"images": [img], "prompt": msgs[:-1], "completion": msgs[-1:]})
        else:
            out.append({"images": [img], "messages": msgs})
    return out


def _answers(root: Path, name: str) -> list[list[str]]:
    return [[c["value"] for c in r["conversations"] if c["from"] == "gpt"]
            for r in json.loads((root / name).read_text())]


def _tiny(template: str):
    model, processor = build_tiny("llava")
    processor.chat_template = template
    processor.tokenizer.chat_template = template
    model.train()  # as in training (the tiny configs have no dropout)
    return model, processor


def _trl(model, processor, examples, tmp_path, *, assistant_only: bool):
    """An SFTTrainer on ``model`` (a copy: TRL patches its forward with the fused LM head) and
    the batch its own collator makes from ``examples``."""
    args = TRLSFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                        fp16=False, activation_checkpointing=False, max_length=None,
                        assistant_only_loss=assistant_only)
    trainer = SFTTrainer(model=copy.deepcopy(model), args=args, processing_class=processor,
                         train_dataset=Dataset.from_list(copy.deepcopy(examples)))
    inputs = trainer.data_collator(copy.deepcopy(examples))
    return trainer, inputs


def _our_batch(adapter, path: Path) -> Batch:
    """Our pipeline, as ``train_sft`` runs it."""
    cfg = DataSection(max_length=1024)

    def tok(rec, imgs):
        t = adapter.tokenize_record(rec, imgs, max_length=cfg.max_length)
        return {"input_ids": t.input_ids, "labels": t.labels}

    examples, loader, _ = load_examples(str(path), cfg, adapter, tok, kind="conversation")
    return SFTCollator(loader, adapter.tokenizer.pad_token_id)(examples)


def _batch_from_trl(adapter, inputs, examples) -> Batch:
    """A vlmalign Batch holding TRL's token ids, mask and labels; images preprocessed by us."""
    images = [adapter.preprocess_image(ex["images"][0]) for ex in examples]
    tensors = {k: inputs[k].clone() for k in ("input_ids", "attention_mask", "labels")}
    return Batch(tensors, images, [[i] for i in range(len(images))], len(images), [None] * len(images))


def _runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of supervised label ids in one row."""
    runs, cur = [], []
    for t in labels.tolist():
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _grad_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> tuple[float, int]:
    """Max |grad difference| over all parameters, and how many parameters got a non-zero grad."""
    other = dict(theirs.named_parameters())
    worst, nonzero = 0.0, 0
    for name, p in ours.named_parameters():
        q = other[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:
            continue
        worst = max(worst, (p.grad - q.grad).abs().max().item())
        nonzero += int(p.grad.abs().sum().item() > 0)
    return worst, nonzero


# ----------------------------------------------------------------------------- 1. batches
def test_prompt_completion_batch_is_identical_to_trls(world, tmp_path):
    model, processor = _tiny(TEMPLATES["tiny"])
    adapter = adapter_for(model, processor)
    examples = _trl_examples(world, "single.json", "prompt_completion")
    trainer, inputs = _trl(model, processor, examples, tmp_path, assistant_only=False)
    assert trainer.completion_only_loss
    ours = _our_batch(adapter, world / "single.json")
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours.tensors[k], inputs[k]), k
    # the same pixels per row, although we hold each distinct image once
    assert len(ours.images) < ours.size
    for r, idx in enumerate(ours.image_indices):
        assert torch.equal(ours.images[idx[0]].tensors["pixel_values"][0], inputs["pixel_values"][r])
    # both supervise each answer and the EOS that ends it, nothing else
    eos = processor.tokenizer.eos_token_id
    for r, answers in enumerate(_answers(world, "single.json")):
        (run,) = _runs(inputs["labels"][r])
        assert run[-1] == eos and processor.tokenizer.decode(run[:-1]).strip() == answers[0]


def test_assistant_only_multi_turn_labels_match_trls_up_to_the_separator_token(world, tmp_path):
    model, processor = _tiny(TEMPLATES["tiny+markers"])
    adapter = adapter_for(model, processor)
    examples = _trl_examples(world, "multi.json", "messages")
    _, inputs = _trl(model, processor, examples, tmp_path, assistant_only=True)
    ours = _our_batch(adapter, world / "multi.json")
    assert torch.equal(ours.tensors["input_ids"], inputs["input_ids"])
    assert torch.equal(ours.tensors["attention_mask"], inputs["attention_mask"])
    space = processor.tokenizer.convert_tokens_to_ids("Ġ")  # byte-level BPE's lone " "
    eos = processor.tokenizer.eos_token_id
    differing_rows = 0
    for r, answers in enumerate(_answers(world, "multi.json")):
        a, b = ours.tensors["labels"][r], inputs["labels"][r]
        diff = (a != b).nonzero().flatten().tolist()
        for i in diff:  # only: we supervise the lone space token right after "ASSISTANT:", TRL does not
            assert a[i] == space and b[i] == IGNORE_INDEX and b[i + 1] != IGNORE_INDEX, (r, i)
        differing_rows += bool(diff)
        runs = _runs(b)
        assert len(runs) == len(answers)
        for run, ans in zip(runs, answers):
            assert run[-1] == eos and processor.tokenizer.decode(run[:-1]).strip() == ans
    assert differing_rows == 1  # the caption ("Yes, ..."); the VQA answers (" red", " 1") merge the space


def test_llava_hf_template_trl_trains_no_eos_we_add_one(world, tmp_path):
    model, processor = _tiny(TEMPLATES["llava-hf"])
    adapter = adapter_for(model, processor)
    examples = _trl_examples(world, "multi.json", "messages")
    _, inputs = _trl(model, processor, examples, tmp_path, assistant_only=True)
    ours = _our_batch(adapter, world / "multi.json")
    tok = processor.tokenizer
    eos = tok.eos_token_id
    for r, answers in enumerate(_answers(world, "multi.json")):
        n = int(inputs["attention_mask"][r].sum())
        theirs_ids = inputs["input_ids"][r, :n].tolist()
        m = int(ours.tensors["attention_mask"][r].sum())
        our_ids = ours.tensors["input_ids"][r, :m].tolist()
        # ids: ours are TRL's plus one EOS after each answer (the template renders none)
        assert eos not in theirs_ids
        assert our_ids.count(eos) == len(answers)
        assert [t for t in our_ids if t != eos] == theirs_ids
        # TRL's labels: per turn the answer and the template's trailing " " token, no EOS
        runs = _runs(inputs["labels"][r])
        assert len(runs) == len(answers)
        for run, ans in zip(runs, answers):
            assert eos not in run
            assert tok.decode(run[-1:]) == " " and tok.decode(run).strip() == ans


@pytest.mark.parametrize("name", ["single.json", "multi.json"])
def test_our_labels_end_every_answer_with_eos_under_the_llava_hf_template(world, name):
    model, processor = _tiny(TEMPLATES["llava-hf"])
    adapter = adapter_for(model, processor)
    ours = _our_batch(adapter, world / name)
    tok = processor.tokenizer
    for r, answers in enumerate(_answers(world, name)):
        runs = _runs(ours.tensors["labels"][r])
        assert len(runs) == len(answers), (r, [tok.decode(x) for x in runs])
        for run, ans in zip(runs, answers):
            assert run[-1] == tok.eos_token_id and tok.decode(run[:-1]).strip() == ans, (r, tok.decode(run))


# ----------------------------------------------------------------------------- 2. loss and gradients
CASES = {  # name -> (template, data file, TRL dataset style)
    "prompt_completion": ("tiny", "single.json", "prompt_completion"),
    "assistant_only": ("tiny+markers", "multi.json", "messages"),
    "llava_hf_no_eos": ("llava-hf", "multi.json", "messages"),
}


@pytest.mark.parametrize("count", ["local", "global"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trls(world, tmp_path, case, count):
    template, name, style = CASES[case]
    model, processor = _tiny(TEMPLATES[template])
    examples = _trl_examples(world, name, style)
    trainer, inputs = _trl(model, processor, examples, tmp_path, assistant_only=style == "messages")
    adapter = adapter_for(model, processor)
    batch = _batch_from_trl(adapter, inputs, examples)
    method = SFTMethod(adapter)
    n_local = method.count_items(batch)
    assert n_local == int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    # "global": this batch as one of three accumulated micro-batches (or processes)
    n_trl, n_ours = (None, n_local) if count == "local" else (3 * n_local, 3 * n_local)

    theirs = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=n_trl)
    loss, sums = method.compute_loss(batch, n_ours)
    assert abs(loss.item() - theirs.item()) <= TOL, (loss.item(), theirs.item())
    assert int(sums["items"]) == n_local
    assert abs(sums["loss"].item() / n_local - theirs.item() * n_ours / n_local) <= TOL

    loss.backward()
    theirs.backward()
    worst, nonzero = _grad_diff(model, trainer.model)
    assert worst <= TOL, worst
    assert nonzero > 20  # vision tower, projector, decoder and head all received gradient

    # our pipeline's batch (each distinct image encoded once) gives the same loss where its ids equal TRL's
    if case == "prompt_completion":
        with torch.no_grad():
            again, _ = method.compute_loss(_our_batch(adapter, world / name), n_ours)
        assert abs(again.item() - loss.item()) <= 1e-6


def test_the_comparison_detects_another_normalisation(world, tmp_path):
    """The rows have different numbers of supervised tokens, so averaging per sequence (or a
    count off by one) gives a clearly different number: the parity above is not vacuous."""
    model, processor = _tiny(TEMPLATES["tiny"])
    examples = _trl_examples(world, "single.json", "prompt_completion")
    trainer, inputs = _trl(model, processor, examples, tmp_path, assistant_only=False)
    adapter = adapter_for(model, processor)
    batch = _batch_from_trl(adapter, inputs, examples)
    per_row = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert len(set(per_row.tolist())) > 1
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, dict(inputs)).item()
        out = trainer.model(**{k: v for k, v in inputs.items() if k != "labels"}, labels=inputs["labels"],
                            fused_lm_head=True)
        per_sequence = (-out.log_probs.sum(1) / per_row).mean().item()
        method = SFTMethod(adapter)
        n = method.count_items(batch)
        ours, _ = method.compute_loss(batch, n)
        off_by_one, _ = method.compute_loss(batch, n + 1)
    assert abs(ours.item() - theirs) <= TOL
    assert abs(per_sequence - theirs) > 100 * TOL
    assert abs(off_by_one.item() - theirs) > 100 * TOL
