"""ShapesWorld's held-out split in benchmark layouts (POPE, MMBench TSV, captions + CHAIR, VQA):
layouts exact, labels and answers true to the scenes, POPE's negatives built as POPE defines
them, and the same bytes for the same ShapesWorld directory."""

import base64
import csv
import io
import json
import re
import shutil
from collections import Counter

import pytest

from vlmalign.data.synthetic.benchmarks import (BENCHMARK_FILES, MCQ_COLUMNS, POPE_SPLITS,
                                                answer_vocabulary, object_vocabulary,
                                                pope_questions, write_benchmarks)
from vlmalign.eval.chair import chair_scores, extract_objects

POPE_KEYS = ["question_id", "image", "image_id", "text", "label"]
_POPE_TEXT = re.compile(r"^Is there an? (\w+) (\w+) in the image\?$")


@pytest.fixture(scope="session")
def bench(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return write_benchmarks(dataset.root, out)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _eval_rows(dataset):
    return [r for r in json.loads((dataset.root / "scenes.json").read_text()) if r["split"] == "eval"]


def _pope_by_image(rows):
    """{image: ([yes objects], [no objects])} in file order."""
    out = {}
    for r in rows:
        m = _POPE_TEXT.match(r["text"])
        assert m, r["text"]
        yes, no = out.setdefault(r["image"], ([], []))
        (yes if r["label"] == "yes" else no).append(f"{m[1]} {m[2]}")
    return out


def test_pope_layout_balanced_labels_true(dataset, bench):
    vocab = object_vocabulary(dataset.config)
    rows_eval = _eval_rows(dataset)
    for split in POPE_SPLITS:
        rows = _lines(bench[f"pope_{split}"])
        assert [list(r) for r in rows] == [POPE_KEYS] * len(rows)  # keys, in POPE's order
        assert [r["question_id"] for r in rows] == list(range(len(rows)))
        labels = Counter(r["label"] for r in rows)
        assert set(labels) == {"yes", "no"} and labels["yes"] == labels["no"]
        for r in rows:
            assert (dataset.root / r["image"]).is_file()
            assert r["image"] == f"images/eval_{r['image_id']:05d}.png"
            colour, shape = _POPE_TEXT.match(r["text"]).groups()
            assert r["label"] == ("yes" if dataset.scenes[r["image"]].has(colour, shape) else "no")
            article = "an" if colour[0] in "aeiou" else "a"
            assert r["text"].startswith(f"Is there {article} ")
        by_image = _pope_by_image(rows)
        assert list(by_image) == [r["image"] for r in rows_eval]  # every held-out image, in order
        for rel, (yes, no) in by_image.items():
            n = len(dataset.scenes[rel].objects)
            assert len(yes) == len(no) == min(3, n, len(vocab) - n)
            assert len(set(yes + no)) == len(yes) + len(no)
            # per image: the yes questions, then the no questions
            labels = [r["label"] for r in rows if r["image"] == rel]
            assert labels == ["yes"] * len(yes) + ["no"] * len(no)


def test_pope_negatives_built_as_pope_defines_them(dataset, bench):
    """Frequencies and co-occurrences recomputed here from scenes.json (held-out images)."""
    vocab = object_vocabulary(dataset.config)
    rank = {o: i for i, o in enumerate(vocab)}
    objects = {r["image"]: [f"{o['colour']} {o['shape']}" for o in r["objects"]] for r in _eval_rows(dataset)}
    freq = Counter(o for objs in objects.values() for o in objs)
    co = {a: Counter() for a in vocab}
    for objs in objects.values():
        for a in objs:
            for b in objs:
                if a != b:
                    co[a][b] += 1
    popular = sorted(freq, key=lambda o: (-freq[o], rank[o]))
    split_rows = {s: _pope_by_image(_lines(bench[f"pope_{s}"])) for s in POPE_SPLITS}
    for rel, objs in objects.items():
        yes_sets = [split_rows[s][rel][0] for s in POPE_SPLITS]
        assert yes_sets[0] == yes_sets[1] == yes_sets[2]  # same positives in the three splits
        yes = yes_sets[0]
        assert set(yes) <= set(objs) and yes == sorted(yes, key=objs.index)
        for split in POPE_SPLITS:
            no = split_rows[split][rel][1]
            for j, (pos, neg) in enumerate(zip(yes, no)):
                taken = set(objs) | set(no[:j])
                assert neg not in taken
                ranked = {"random": [], "popular": popular,
                          "adversarial": sorted((o for o in co[pos] if co[pos][o] > 0),
                                                key=lambda o: (-co[pos][o], rank[o]))}[split]
                expected = next((o for o in ranked if o not in taken), None)
                if expected is not None:
                    assert neg == expected, (split, rel, pos)
                elif any(o not in taken for o in freq):
                    assert neg in freq  # fallback: an object of the held-out images


def test_pope_construction_on_a_toy():
    vocab = ["a", "b", "c", "d", "e"]
    lists = [["a", "b"], ["a", "b"], ["a", "c"], ["d"], ["a", "b", "c"]]
    # frequencies a 4, b 3, c 2, d 1, e 0 (not in the images); co-occurrence a-b 3, a-c 2, b-c 1
    out = pope_questions(lists, vocab, seed=0)
    pos = {s: [[o for o, lab in q if lab == "yes"] for q in out[s]] for s in POPE_SPLITS}
    neg = {s: [[o for o, lab in q if lab == "no"] for q in out[s]] for s in POPE_SPLITS}
    assert pos["random"] == pos["popular"] == pos["adversarial"]
    assert pos["popular"][:4] == [["a", "b"], ["a", "b"], ["a", "c"], ["d"]]
    assert len(pos["popular"][4]) == 2  # only d and e are absent: 2 pairs, not 3
    # popular: most frequent absent object first, never one already asked
    assert neg["popular"][:4] == [["c", "d"], ["c", "d"], ["b", "d"], ["a"]]
    assert neg["popular"][4] == ["d", "e"]  # e only when nothing of the images is left
    # adversarial: most co-occurring with the j-th positive, then the random fallback
    assert neg["adversarial"][0] == ["c", "d"]  # a -> b present, c; b -> a present, c asked -> d
    assert neg["adversarial"][2] == ["b", "d"]  # a -> b; c -> a present, b asked -> d
    assert len(neg["adversarial"][3]) == 1 and neg["adversarial"][3][0] in {"a", "b", "c"}  # d co-occurs with none
    for s in POPE_SPLITS:
        for objs, p, n in zip(lists, pos[s], neg[s]):
            assert len(p) == len(n) and not set(n) & set(objs) and len(set(n)) == len(n)
        for n in neg[s][:4]:
            assert "e" not in n  # random draws come from the images' objects first
    assert pope_questions(lists, vocab, seed=0) == out
    with pytest.raises(ValueError, match="not in the vocabulary"):
        pope_questions([["z"]], vocab, seed=0)


def _tsv(path):
    return list(csv.reader(io.StringIO(path.read_text()), delimiter="\t"))


def test_mmbench_tsv(dataset, bench, oracle):
    table = _tsv(bench["mmbench"])
    assert tuple(table[0]) == MCQ_COLUMNS
    rows = [dict(zip(table[0], r)) for r in table[1:]]
    vqa = dataset.load("vqa_eval")
    assert len(rows) == len(vqa)
    vocab = answer_vocabulary(dataset.config)
    letters_used = Counter()
    for i, (row, rec) in enumerate(zip(rows, vqa)):
        assert len(row) == len(MCQ_COLUMNS)
        assert int(row["index"]) == i < 1_000_000
        assert base64.b64decode(row["image"]) == (dataset.root / rec["image"]).read_bytes()
        assert row["category"] == rec["question_type"]
        assert row["l2-category"] and row["split"] == "dev" and row["hint"] == ""
        assert "<image>" not in row["question"] and row["question"] in rec["question"]
        values = vocab[rec["question_type"]]
        k = min(4, len(values))
        options = [row[c] for c in "ABCD"]
        assert all(options[:k]) and not any(options[k:])
        assert len(set(options[:k])) == k and set(options[:k]) <= set(values)
        assert row["answer"] in "ABCD"[:k]
        assert row[row["answer"]] == rec["answer"]
        assert row[row["answer"]] == oracle(row["question"], dataset.scenes[rec["image"]])
        letters_used[row["answer"]] += 1
    assert {r["category"] for r in rows} == set(dataset.config.question_types)
    assert len(letters_used) >= 3  # the right answer is not always in one place


def test_mmbench_tsv_reads_as_vlmevalkit_reads_it(small, tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(write_benchmarks(small.root, tmp_path)["mmbench"], sep="\t")
    assert list(df.columns) == list(MCQ_COLUMNS)
    assert df["hint"].isna().all()  # no hint, as VLMEvalKit's build_prompt tests it
    yes_no = df[df["category"] == "existence"]
    assert yes_no["C"].isna().all() and yes_no["D"].isna().all()


def test_caption_and_chair(dataset, bench, is_caption_prompt):
    rows = _lines(bench["caption"])
    meta = json.loads(bench["chair_vocab"].read_text())
    vocab, synonyms = meta["vocabulary"], meta["synonyms"]
    assert vocab == object_vocabulary(dataset.config)
    assert set(synonyms.values()) <= set(vocab)
    assert [r["image"] for r in rows] == [r["image"] for r in _eval_rows(dataset)]
    mentions = []
    for i, r in enumerate(rows):
        assert list(r) == ["question_id", "image", "text", "captions", "objects"] and r["question_id"] == i
        scene = dataset.scenes[r["image"]]
        assert r["objects"] == [f"{o.colour} {o.shape}" for o in scene.objects]
        assert set(r["objects"]) <= set(vocab)
        assert is_caption_prompt(r["text"]) and "<image>" not in r["text"]
        (ref,) = r["captions"]
        found = extract_objects(ref, vocab, synonyms)
        assert Counter(found) == Counter(r["objects"])
        mentions.append(found)
    scores = chair_scores(mentions, [r["objects"] for r in rows])
    assert scores["chair_s"] == scores["chair_i"] == 0.0
    # the one-error captions of ranked_eval.json: one hallucinated object each
    ranked = {r["image"]: r["conversations"][1]["value"][1] for r in dataset.load("ranked_eval")}
    bad = [extract_objects(ranked[r["image"]], vocab, synonyms) for r in rows]
    scores = chair_scores(bad, [r["objects"] for r in rows])
    assert scores["chair_s"] == 1.0 and scores["hallucinated_mentions"] == len(rows)


def test_vqa_file(dataset, bench, oracle):
    rows = _lines(bench["vqa"])
    vqa = dataset.load("vqa_eval")
    assert len(rows) == len(vqa)
    for i, (r, rec) in enumerate(zip(rows, vqa)):
        assert list(r) == ["question_id", "image", "text", "category", "answer"] and r["question_id"] == i
        assert r["image"] == rec["image"] and (dataset.root / r["image"]).is_file()
        assert r["category"] == rec["question_type"] and r["answer"] == rec["answer"]
        assert "<image>" not in r["text"] and r["text"] == rec["question"].replace("<image>", "").strip()
        assert r["answer"] == oracle(r["text"], dataset.scenes[r["image"]])


def test_same_directory_same_bytes(small, tmp_path):
    a = write_benchmarks(small.root, tmp_path / "a")
    b = write_benchmarks(small.root, tmp_path / "b")
    assert set(a) == set(BENCHMARK_FILES)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    # a copy of the ShapesWorld directory, default out_dir (data_dir/benchmarks)
    copy = tmp_path / "copy"
    shutil.copytree(small.root, copy, ignore=shutil.ignore_patterns("benchmarks"))
    c = write_benchmarks(copy)
    assert c == {name: copy / "benchmarks" / fname for name, fname in BENCHMARK_FILES.items()}
    for name in a:
        assert a[name].read_bytes() == c[name].read_bytes(), name
