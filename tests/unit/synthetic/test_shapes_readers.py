"""Every file ShapesWorld writes is read by vlmalign's readers into the expected record kinds,
with images that resolve under the output directory."""

import pytest

from vlmalign.data.images import load_image
from vlmalign.data.synthetic import FILES, answer_matches

try:
    from vlmalign.data import read_file  # re-export, if the data package provides one
except ImportError:
    from vlmalign.data.readers import read_file
from vlmalign.data.readers import detect_format

EXPECTED_KINDS = {
    "captions_train": "conversation", "captions_eval": "conversation",
    "vqa_train": "conversation", "vqa_eval": "rl_prompt", "pope_eval": "rl_prompt",
    "dpo_train": "preference", "dpo_eval": "preference", "ranked_train": "ranked",
    "ranked_eval": "ranked", "rl_train": "rl_prompt", "rl_eval": "rl_prompt",
    "kto_train": "unpaired", "kto_eval": "unpaired", "sft_train": "conversation",
    "hallucination_train": "preference", "hallucination_eval": "preference",
    "hallucination_qa_train": "preference", "hallucination_qa_eval": "preference",
}


def test_expected_kinds_cover_every_data_file():
    assert set(EXPECTED_KINDS) == {n for n in FILES if n != "scenes"}
    assert {n: k for n, (_, _, k) in FILES.items() if k} == EXPECTED_KINDS


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_reader_reads_every_file(dataset, name):
    path = dataset.paths[name]
    raw = dataset.load(name)
    fmt = FILES[name][1]
    assert detect_format(path) == fmt
    for recs in (read_file(path), read_file(path, format=fmt)):
        assert len(recs) == len(raw)
        assert {r.kind for r in recs} == {EXPECTED_KINDS[name]}
        for rec, row in zip(recs, raw):
            assert rec.id == row["id"]
            assert len(rec.images) == 1
            assert rec.images[0].path == (row.get("images") or [row.get("image")])[0]
    for img in {r.images[0] for r in recs[:5]}:
        assert load_image(img, root=dataset.root).size == (dataset.config.image_size,) * 2
    rec, row = recs[0], raw[0]
    if rec.kind == "rl_prompt":
        assert rec.reference == row["answer"] and rec.prompt[-1].text.strip() == row["question"].replace("<image>", "").strip()
    elif rec.kind == "preference":
        assert (rec.chosen, rec.rejected) == (row["chosen"], row["rejected"])
        assert not answer_matches(rec.rejected, rec.chosen)
    elif rec.kind == "ranked":
        assert rec.responses == row["conversations"][-1]["value"]
    elif rec.kind == "unpaired":
        assert (rec.completion, rec.label) == (row["completion"], row["label"])
    else:
        assert rec.messages[-1].role == "assistant"
        assert rec.messages[-1].text == row["conversations"][-1]["value"]
        assert "<image>" not in "".join(m.text for m in rec.messages)


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_image_position_survives_reading(dataset, name):
    """Whatever the format, the first user turn reads as [image, text] by default and as
    [text, image] with ``image_position="after"``."""
    from vlmalign.data.schema import ImagePart
    after = dataset.config.image_position == "after"
    for rec in read_file(dataset.paths[name])[:10]:
        turns = rec.messages if rec.kind == "conversation" else rec.prompt
        first = next(m for m in turns if m.role == "user")
        kinds = ["image" if isinstance(p, ImagePart) else "text" for p in first.content]
        assert kinds == (["text", "image"] if after else ["image", "text"]), (rec.id, first.content)
