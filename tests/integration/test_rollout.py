"""The rollout engine (vlmalign.rollout.rollout) on tiny random-init LLaVA and Qwen2-VL models with
ShapesWorld RL prompts: images encoded once, k samples per prompt, stop tokens and masks, left
padding (incl. Qwen2-VL's M-RoPE), log-prob recomputation, seeds, values, sub-batches, errors."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from vlmalign.data.batching import ImageLoader
from vlmalign.data.readers import read_file
from vlmalign.data.schema import Conversation, ImageRef, Message, RLPrompt
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.errors import DataError
from vlmalign.models import ScalarModel, adapter_for, build_tiny
from vlmalign.rollout import (RolloutError, SamplingConfig, filter_logits, response_stop_mask, rollout,
                              sequence_logprobs, sequence_values)

FAMILIES = ["llava", "qwen2_vl"]
SAMPLE = SamplingConfig(max_new_tokens=8, temperature=1.0)
GREEDY = SamplingConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout") / "data"
    generate_shapesworld(root, ShapesConfig(seed=1, train_images=6, eval_images=2))
    recs = read_file(root / "rl_train.json", kind="rl_prompt")
    return root, recs


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, data):
    model, processor = build_tiny(request.param)
    model.eval()
    ad = adapter_for(model, processor)
    return request.param, ad, ImageLoader(ad, data[0])


def _long_prompt(recs):
    """A two-image, multi-turn prompt: much longer than a ShapesWorld question, so the short ones
    batched with it are left-padded."""
    a, b = recs[1].images[0], recs[0].images[0]
    return RLPrompt([Message.user(a, "Look at this picture and then at the next one."), Message.assistant("ok"),
                     Message.user(b, "Now tell me: " + recs[1].prompt[-1].text)], source="long.json", index=3)


def _masked_close(a, b, mask, tol):
    assert a.shape == b.shape
    assert (a[~mask] == 0).all() and (b[~mask] == 0).all()
    return (a - b).abs()[mask].max().item() <= tol


# ---------------------------------------------------------------------- pure helpers
def test_filter_logits_top_k_then_top_p_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    # softmax: e^2, e^1, e^0, e^-1 = 7.389, 2.718, 1, 0.368 (sum 11.475) -> p = .6439 .2369 .0871 .0321
    kept = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    assert kept(filter_logits(z, top_k=2)) == [True, True, False, False]
    # mass before each token: 0, .6439, .8808, .9679; kept while < top_p
    assert kept(filter_logits(z, top_p=0.6)) == [True, False, False, False]
    assert kept(filter_logits(z, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(z, top_p=0.89)) == [True, True, True, False]
    # top-k first, then top-p on the renormalised survivors: 7.389, 2.718, 1 (sum 11.107) ->
    # p = .6652 .2447 .0900, mass before the third = .9099 >= .89, so it goes
    assert kept(filter_logits(z, top_k=3, top_p=0.89)) == [True, True, False, False]
    # kept logits are unchanged; ties with the k-th largest are kept
    assert torch.equal(filter_logits(z, top_k=2)[0, :2], z[0, :2])
    assert kept(filter_logits(torch.tensor([[1.0, 1.0, 0.0]]), top_k=1)) == [True, True, False]


def test_response_stop_mask_by_hand():
    seq = torch.tensor([[5, 7, 2, 9], [5, 6, 7, 8], [2, 0, 0, 0], [9, 2, 4, 4]])
    mask, fin = response_stop_mask(seq, [2, 9])
    assert mask.int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert fin.tolist() == [True, False, True, True]


# ---------------------------------------------------------------------- encoding once
def test_images_encoded_once_per_unique_image(fam, data):
    name, ad, loader = fam
    _, recs = data
    same_image = RLPrompt([Message.user(recs[0].images[0], "How many shapes are there?")])
    records = [recs[0], recs[1], same_image, recs[2]]
    for batch_size in (None, 1):  # one generate call, or one per prompt: still one encoding
        calls, n_img = ad.encode_calls, ad.encoded_images
        b = rollout(ad, records, loader, SAMPLE, k=3, seed=0, batch_size=batch_size)
        assert ad.encode_calls - calls == 1
        assert ad.encoded_images - n_img == 3 == len(b.images) == len(b.encoded)
        assert b.num_rows == 12 and b.group_ids.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
        rows = b.image_indices
        assert rows[0:3] == [[0]] * 3 and rows[3:6] == [[1]] * 3
        assert rows[6:9] == [[0]] * 3          # another prompt showing recs[0]'s image shares it
        assert rows[9:12] == [[2]] * 3


# ---------------------------------------------------------------------- k samples
def test_k_samples_differ_under_sampling_and_agree_when_greedy(fam, data):
    name, ad, loader = fam
    recs = data[1][:3]
    b = rollout(ad, recs, loader, SAMPLE, k=4, seed=0)
    for g in range(3):
        rows = {tuple(b.response_ids[r].tolist()) for r in range(4 * g, 4 * g + 4)}
        assert len(rows) > 1, f"{name}: the 4 samples of prompt {g} are all the same"
    g = rollout(ad, recs, loader, GREEDY, k=3, seed=0)
    assert g.temperature == 1.0 and (g.sampling_logprobs == 0).all()   # greedy: point mass
    for grp in range(3):
        r0 = 3 * grp
        for r in (r0 + 1, r0 + 2):
            assert torch.equal(g.response_ids[r], g.response_ids[r0])
            # identical tokens; log-probs of different batch rows may differ in the last bits (BLAS
            # blocking depends on the thread count)
            assert torch.allclose(g.logprobs[r], g.logprobs[r0], rtol=0, atol=1e-5)
            assert g.texts[r] == g.texts[r0]


# ---------------------------------------------------------------------- stop tokens and masks
def test_stop_on_eos_and_mask(fam, data):
    name, ad0, _ = fam
    root, recs = data
    # a random model rarely says EOS: scale its EOS output row so that it does at some steps
    model = copy.deepcopy(ad0.model)
    ad = adapter_for(model, ad0.processor)
    eos = ad.tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] *= {"llava": 20.0, "qwen2_vl": 15.0}[name]
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0)
    b = rollout(ad, recs[:4], ImageLoader(ad, root), cfg, k=4, seed=0)
    stops = set(ad.stop_token_ids())
    lengths = b.response_lengths.tolist()
    assert b.finished.any() and not b.finished.all(), "the test needs finished and unfinished rows"
    assert any(f and n < cfg.max_new_tokens for f, n in zip(b.finished.tolist(), lengths))
    assert b.response_ids.shape[1] == cfg.max_new_tokens   # some row ran to the limit
    for r in range(b.num_rows):
        n = lengths[r]
        ids = b.response_ids[r].tolist()
        assert b.response_mask[r].tolist() == [True] * n + [False] * (len(ids) - n)
        assert not any(t in stops for t in ids[:n - 1])       # no stop token before the last one
        if b.finished[r]:
            assert ids[n - 1] in stops
        else:
            assert n == cfg.max_new_tokens and ids[n - 1] not in stops
        assert all(t == b.pad_token_id for t in ids[n:])
        assert (b.logprobs[r, n:] == 0).all() and (b.logprobs[r, :n] < 0).all()
        assert ad.tokenizer.eos_token not in b.texts[r]
    # the attention mask covers the prompt and the response up to the stop token
    assert torch.equal(b.attention_mask.sum(1), b.prompt_mask.sum(1) + b.response_mask.sum(1))
    # and the masked log-probs still equal a recomputation
    assert _masked_close(sequence_logprobs(ad, b), b.logprobs, b.response_mask, 1e-4)


# ---------------------------------------------------------------------- left padding
def test_left_padding_gives_the_tokens_of_the_prompt_alone(fam, data):
    name, ad, loader = fam
    recs = data[1]
    alone = rollout(ad, [recs[0]], loader, GREEDY, k=1, seed=0)
    both = rollout(ad, [recs[0], _long_prompt(recs)], loader, GREEDY, k=1, seed=0)
    plen = both.prompt_mask.sum(1).tolist()
    assert plen[0] < plen[1] == both.prompt_length     # recs[0] is left-padded in the batch
    assert both.prompt_mask[0, : plen[1] - plen[0]].eq(0).all()
    n = int(alone.response_lengths[0])
    assert torch.equal(both.response_ids[0, :n], alone.response_ids[0, :n])
    assert int(both.response_lengths[0]) == n
    assert (both.logprobs[0, :n] - alone.logprobs[0, :n]).abs().max().item() < 1e-4
    # one generate call per prompt (each padded on its own) merges into the same batch
    chunked = rollout(ad, [recs[0], _long_prompt(recs)], loader, GREEDY, k=1, seed=0, batch_size=1)
    assert torch.equal(chunked.prompt_ids, both.prompt_ids) and torch.equal(chunked.prompt_mask, both.prompt_mask)
    T = int(chunked.response_lengths.max())
    assert torch.equal(chunked.response_ids[:, :T], both.response_ids[:, :T])
    assert torch.equal(chunked.response_mask, both.response_mask[:, :chunked.response_mask.shape[1]])
    assert _masked_close(chunked.logprobs, both.logprobs[:, :chunked.logprobs.shape[1]], chunked.response_mask, 1e-4)


# ---------------------------------------------------------------------- log-prob recomputation
def test_recomputed_logprobs_equal_sampling_logprobs(fam, data):
    name, ad, loader = fam
    recs = data[1]
    records = [recs[0], _long_prompt(recs), recs[2]]   # left padding in the batch
    b = rollout(ad, records, loader, SamplingConfig(max_new_tokens=10, temperature=1.0), k=2, seed=3)
    assert b.prompt_mask.sum(1).min() < b.prompt_length
    assert torch.equal(b.sampling_logprobs, b.logprobs) or (
        (b.sampling_logprobs - b.logprobs)[b.response_mask].min() >= -1e-6)  # only placeholder ids removed
    calls = ad.encode_calls
    lp = sequence_logprobs(ad, b)                      # re-encodes the 3 unique images once
    assert ad.encode_calls == calls + 1
    assert lp.dtype == torch.float32 and lp.shape == b.logprobs.shape
    assert _masked_close(lp, b.logprobs, b.response_mask, 1e-4)
    # the sampling-time features give the same numbers without encoding again
    lp2 = sequence_logprobs(ad, b, encoded=b.encoded)
    assert ad.encode_calls == calls + 1
    assert _masked_close(lp2, b.logprobs, b.response_mask, 1e-4)
    if name == "qwen2_vl":
        # M-RoPE positions are in effect: 1-D positions (right for text, wrong for image tokens)
        # score differently, so the equality above depends on the model's 3-D positions with left
        # padding. (1-D RoPE families are shift-invariant: left padding cannot change their logits.)
        T = b.response_ids.shape[1]
        pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = ad.forward(b.input_ids, b.attention_mask, encoded=b.encoded, image_indices=b.image_indices,
                             position_ids=pos, logits_to_keep=T + 1)
        flat = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, b.response_ids[..., None])[..., 0]
        diff = (flat - b.logprobs).abs().masked_fill(~b.response_mask, 0).max().item()
        assert diff > 1e-3, f"1-D positions gave the M-RoPE log-probs ({diff})"


def test_temperature_and_filtering_logprobs(fam, data):
    name, ad, loader = fam
    recs = data[1]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.8)
    b = rollout(ad, [recs[0], _long_prompt(recs)], loader, cfg, k=3, seed=1)
    assert b.temperature == 0.7
    m = b.response_mask
    # logprobs are log_softmax(z / 0.7) (unfiltered): the recomputation divides by the same T
    assert _masked_close(sequence_logprobs(ad, b), b.logprobs, m, 1e-4)
    t1 = sequence_logprobs(ad, b, temperature=1.0)
    assert (t1 - b.logprobs)[m].abs().max() > 1e-3
    # the filtered distribution renormalises over <= 5 tokens: every sampled token is more likely
    # there, and it is one of the 5 most likely tokens at its step
    assert ((b.sampling_logprobs - b.logprobs)[m] > 0).all()
    _, h = sequence_logprobs(ad, b, return_hidden=True)
    with torch.no_grad():
        logits = ad.model.lm_head(h)                                  # (R, T, V) raw logits
    picked = logits.gather(-1, b.response_ids[..., None])
    rank = (logits > picked).sum(-1)                                  # (R, T) tokens more likely
    assert (rank[m] < 5).all()
    assert (rank[m] > 0).any()                                        # not just greedy


# ---------------------------------------------------------------------- determinism
def test_seed_determinism_without_touching_the_global_rng(fam, data):
    name, ad, loader = fam
    recs = data[1][:3]
    state = torch.get_rng_state()
    a = rollout(ad, recs, loader, SAMPLE, k=2, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    b = rollout(ad, recs, loader, SAMPLE, k=2, seed=11)
    c = rollout(ad, recs, loader, SAMPLE, k=2, seed=12)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.texts == b.texts and a.seed == 11
    assert not torch.equal(a.response_ids, c.response_ids)
    # seed=None draws its seed from the global RNG: torch.manual_seed upstream fixes the result
    torch.manual_seed(5)
    d = rollout(ad, recs, loader, SAMPLE, k=2)
    torch.manual_seed(5)
    e = rollout(ad, recs, loader, SAMPLE, k=2)
    assert d.seed == e.seed and torch.equal(d.response_ids, e.response_ids)


def test_row_seeds_make_a_rows_tokens_independent_of_its_batch(fam, data):
    """One generator per row (the online loop's sampling under several processes): a prompt's
    samples are the same drawn alone, beside other (longer, left-padding) prompts, or in
    another order."""
    name, ad, loader = fam
    recs = [data[1][0], data[1][2], _long_prompt(data[1])]
    seeds = {id(r): [100 + 10 * i + j for j in range(2)] for i, r in enumerate(recs)}
    full = rollout(ad, recs, loader, SAMPLE, k=2, row_seeds=[s for r in recs for s in seeds[id(r)]])
    for order in ([recs[1]], [recs[2], recs[1]]):
        part = rollout(ad, order, loader, SAMPLE, k=2, row_seeds=[s for r in order for s in seeds[id(r)]])
        pos = order.index(recs[1])
        a, b = full.select([2, 3]), part.select([2 * pos, 2 * pos + 1])
        T = min(a.response_ids.shape[1], b.response_ids.shape[1])
        assert torch.equal(a.response_mask.sum(1), b.response_mask.sum(1))
        assert torch.equal(a.response_ids[:, :T][a.response_mask[:, :T]], b.response_ids[:, :T][b.response_mask[:, :T]])
        assert a.texts == b.texts
    with pytest.raises(RolloutError, match="row_seeds"):
        rollout(ad, recs, loader, SAMPLE, k=2, row_seeds=[1, 2])


# ---------------------------------------------------------------------- training side
def test_gradients_hidden_states_and_sub_batches(data):
    root, recs = data
    model, processor = build_tiny("llava")
    model.eval()
    ad = adapter_for(model, processor)
    loader = ImageLoader(ad, root)
    b = rollout(ad, [recs[0], _long_prompt(recs), recs[2]], loader, SAMPLE, k=2, seed=4)
    lp, h = sequence_logprobs(ad, b, with_grad=True, return_hidden=True)
    assert lp.requires_grad and h.shape == (*b.response_ids.shape, model.config.text_config.hidden_size)
    # hidden state j is the one that predicts response token j
    head = torch.log_softmax(model.lm_head(h).float(), -1).gather(-1, b.response_ids[..., None])[..., 0]
    assert _masked_close(head.masked_fill(~b.response_mask, 0).detach(), b.logprobs, b.response_mask, 1e-4)
    (-(lp * b.response_mask).sum()).backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0   # re-encoded with grad
    # a sub-batch keeps only its rows' images and padding, and scores them the same
    sub = b.select([1, 4])
    assert sub.group_ids.tolist() == [0, 2] and sub.image_indices == [[0], [1]]
    assert len(sub.images) == 2 and sub.images[1] is b.images[2]          # the long prompt's 2nd image left out
    assert sub.encoded.features[1] is b.encoded.features[2]
    assert sub.prompt_length == int(sub.prompt_mask.sum(1).max())
    assert sub.response_ids.shape[1] == int(sub.response_mask.sum(1).max())
    full = sequence_logprobs(ad, b, encoded=b.encoded)
    part = sequence_logprobs(ad, sub, encoded=sub.encoded)
    T = part.shape[1]
    assert _masked_close(part, full[[1, 4], :T], sub.response_mask, 1e-5)
    assert sub.texts == [b.texts[1], b.texts[4]]


@pytest.mark.parametrize("family", ["llava", "internvl", "idefics3"])
def test_prefix_shared_logprobs_equal_whole_rows(data, family):
    """update.prefix_sharing: each group's prompt runs once (counted) and log-probs, hidden states
    and gradients equal the whole-row forward's, with left-padded prompts of different lengths."""
    root, recs = data
    model, processor = build_tiny(family)
    model.eval()
    ad = adapter_for(model, processor)
    assert ad.prefix_sharing_problem() is None
    b = rollout(ad, [recs[0], _long_prompt(recs), recs[2]], ad_loader := ImageLoader(ad, root), SAMPLE, k=3, seed=5)
    assert ad_loader and b.num_rows == 9 and int(b.prompt_mask.sum(1).min()) < b.prompt_length   # left-padded
    w = torch.randn(b.response_ids.shape, generator=torch.Generator().manual_seed(0))

    def run(batch, share):
        model.zero_grad()
        rows = []
        real = ad.forward
        ad.forward = lambda ids, *a, **k: rows.append(ids.shape[0]) or real(ids, *a, **k)
        try:
            lp, h = sequence_logprobs(ad, batch, with_grad=True, return_hidden=True, share_prefix=share)
        finally:
            del ad.forward
        ((lp * w[:len(lp), :lp.shape[1]]).sum() + h.pow(2).mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return lp.detach(), h.detach(), grads, rows

    # the whole batch, and a sub-batch that splits groups (as micro-batches of 5 rows do)
    for batch, prompts in ((b, 3), (b.select([0, 1, 3, 4, 8]), 3)):
        lp0, h0, g0, rows0 = run(batch, False)
        lp1, h1, g1, rows1 = run(batch, True)
        R = batch.num_rows
        assert rows0 == [R] and rows1 == [prompts, R]     # each prompt once, then every row's continuation
        assert _masked_close(lp1, lp0, batch.response_mask, 1e-5)
        assert (h1 - h0)[batch.response_mask].abs().max() <= 1e-5
        assert g0.keys() == g1.keys() and len(g0) > 5
        for n in g0:
            scale = g0[n].abs().max().item()
            assert (g1[n] - g0[n]).abs().max().item() <= 1e-5 * max(scale, 1e-3), (n, scale)
    lp0 = run(b, False)[0]
    # a batch that cannot share (here: rows of one group with different prompts) falls back
    bad = b.select(range(9))
    bad.group_ids = torch.zeros(9, dtype=torch.long)
    assert _masked_close(sequence_logprobs(ad, bad, encoded=b.encoded, share_prefix=True), lp0, b.response_mask, 1e-5)


@pytest.mark.parametrize("family", ["llava", "internvl", "idefics3"])
def test_shared_prefill_samples_the_same_tokens(data, family):
    """rollout.prefix_sharing: each prompt is prefilled once (counted) for its k rows, and with
    per-row seeds the samples and their log-probs are those of a rollout that prefills every row."""
    root, recs = data
    model, processor = build_tiny(family)
    model.eval()
    ad = adapter_for(model, processor)
    loader = ImageLoader(ad, root)
    prompts, seeds = [recs[0], _long_prompt(recs), recs[2]], list(range(9))
    a = rollout(ad, prompts, loader, SAMPLE, k=3, seed=5, row_seeds=seeds)
    rows = []
    real = ad.forward
    ad.forward = lambda ids, *x, **kw: rows.append(ids.shape[0]) or real(ids, *x, **kw)
    try:
        b = rollout(ad, prompts, loader, SAMPLE, k=3, seed=5, row_seeds=seeds, share_prefill=True)
    finally:
        del ad.forward
    assert rows == [3]                                   # the three prompts, once each
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert _masked_close(b.logprobs, a.logprobs, a.response_mask, 1e-5)
    assert _masked_close(b.logprobs, sequence_logprobs(ad, b, encoded=b.encoded), b.response_mask, 1e-4)


def test_values_for_a_value_head(data):
    root, recs = data
    policy = adapter_for(*build_tiny("llava"))
    b = rollout(policy, [recs[0], _long_prompt(recs)], ImageLoader(policy, root), SAMPLE, k=2, seed=2)
    model, processor = build_tiny("llava", seed=1)
    critic = ScalarModel(adapter_for(model.eval(), processor), kind="value")
    values = sequence_values(critic, b)
    assert values.shape == b.response_ids.shape and (values[~b.response_mask] == 0).all()
    # values[:, 0] is the value of the prompt alone: score each prompt unpadded, one at a time
    for r in range(b.num_rows):
        ids = b.prompt_ids[r][b.prompt_mask[r].bool()][None]
        enc = critic.adapter.encode_images([b.images[i] for i in b.image_indices[r]])
        with torch.no_grad():
            out = critic.adapter.forward(ids, torch.ones_like(ids), encoded=enc,
                                         image_indices=[list(range(len(b.image_indices[r])))])
        assert abs(out.scores[0].item() - values[r, 0].item()) < 1e-4
        # and values[:, j] is the value after response token j-1
        n = int(b.response_lengths[r])
        if n >= 2:
            ids2 = torch.cat([ids, b.response_ids[r, :1][None]], dim=1)
            with torch.no_grad():
                out2 = critic.adapter.forward(ids2, torch.ones_like(ids2), encoded=enc,
                                              image_indices=[list(range(len(b.image_indices[r])))])
            assert abs(out2.scores[0].item() - values[r, 1].item()) < 1e-4


# ---------------------------------------------------------------------- errors and backends
def test_clear_errors(data):
    root, recs = data
    ad = adapter_for(*build_tiny("llava"))
    loader = ImageLoader(ad, root)
    try:
        import vllm  # noqa: F401
        has_vllm = True
    except ImportError:
        has_vllm = False
    if not (has_vllm and torch.cuda.is_available()):
        with pytest.raises(RolloutError, match="vllm" if not has_vllm else "CUDA"):
            rollout(ad, recs[:1], loader, SAMPLE, k=2, backend="vllm")
    with pytest.raises(RolloutError, match="unknown rollout backend 'sglang'"):
        rollout(ad, recs[:1], loader, SAMPLE, k=2, backend="sglang")
    with pytest.raises(RolloutError, match="k .* must be >= 1"):
        rollout(ad, recs[:1], loader, SAMPLE, k=0)
    with pytest.raises(RolloutError, match="top_p"):
        rollout(ad, recs[:1], loader, SamplingConfig(temperature=1.0, top_p=0.0), k=1)
    conv = Conversation([Message.user("hi"), Message.assistant("yo")], source="c.json", index=4)
    with pytest.raises(RolloutError, match=r"c\.json: record 4: field 'prompt'"):
        rollout(ad, [recs[0], conv], loader, SAMPLE, k=1)
    missing = RLPrompt([Message.user(ImageRef("images/nope.png"), "What?")], source="rl.json", index=9)
    with pytest.raises(DataError, match=r"rl\.json: record 9: field 'image'"):
        rollout(ad, [missing], loader, SAMPLE, k=1)
    from vlmalign.errors import LengthError
    with pytest.raises(LengthError, match=r"rl_train\.json: record 0: .*over max_length 10"):
        rollout(ad, recs[:2], loader, SAMPLE, k=1, max_prompt_length=10)


class _FakeLogprob:
    def __init__(self, lp):
        self.logprob = lp


class _FakeEngine:
    """Stands in for vllm.LLM: answers with fixed token rows (the glue around vLLM is ours to test;
    vLLM itself is not installed here)."""

    def __init__(self, adapter, loader, answers, prompt_shift=0):
        self.ad, self.loader, self.answers, self.shift = adapter, loader, answers, prompt_shift
        self.calls = []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        outs = []
        for p, rec in zip(prompts, self.records):
            imgs = [self.loader.inputs(r) for r in rec.images]
            ids = self.ad.tokenize_prompt(rec.prompt, imgs).input_ids[self.shift:]
            samples = []
            for toks, reason, stop_reason in self.answers[: params["n"]]:
                samples.append(types.SimpleNamespace(
                    token_ids=list(toks), finish_reason=reason, stop_reason=stop_reason,
                    logprobs=[{t: _FakeLogprob(-0.5)} for t in toks]))
            outs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=samples))
        return outs


def test_vllm_glue_with_a_fake_engine(data, monkeypatch):
    root, recs = data
    ad = adapter_for(*build_tiny("llava"))
    ad.model.eval()
    loader = ImageLoader(ad, root)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RolloutError, match="needs vllm_engine"):
        rollout(ad, recs[:2], loader, SAMPLE, k=2, backend="vllm")
    eos = ad.tokenizer.eos_token_id
    a, b_, c = ad.tokenizer.convert_tokens_to_ids(["red", "circle", "blue"])
    # finished with EOS in the output; stopped with EOS left out (stop_reason names it); ran out
    answers = [([a, b_, eos], "stop", None), ([c], "stop", eos), ([a, c, a, c], "length", None)]
    eng = _FakeEngine(ad, loader, answers)
    eng.records = recs[:2]
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.9, top_k=7)
    batch = rollout(ad, recs[:2], loader, cfg, k=3, seed=5, backend="vllm", vllm_engine=eng)
    params = eng.calls[0][1]
    assert params["n"] == 3 and params["temperature"] == 0.9 and params["top_k"] == 7
    assert params["max_tokens"] == 4 and params["seed"] == 5 and params["stop_token_ids"] == ad.stop_token_ids()
    assert "multi_modal_data" in eng.calls[0][0][0]
    assert batch.response_lengths.tolist() == [3, 2, 4] * 2
    assert batch.finished.tolist() == [True, True, False] * 2
    assert batch.response_ids[1, :2].tolist() == [c, eos]
    assert batch.texts[0] == ad.tokenizer.decode([a, b_], skip_special_tokens=True).strip()
    assert _masked_close(batch.logprobs, sequence_logprobs(ad, batch), batch.response_mask, 1e-5)
    m = batch.response_mask
    assert batch.sampling_logprobs[0, :3].tolist() == [-0.5] * 3
    assert batch.sampling_logprobs[1, 1].item() == pytest.approx(batch.logprobs[1, 1].item())  # appended EOS
    assert (batch.sampling_logprobs[~m] == 0).all()
    # a prompt vLLM tokenized differently is refused
    bad = _FakeEngine(ad, loader, answers, prompt_shift=1)
    bad.records = recs[:2]
    with pytest.raises(RolloutError, match="tokenized the prompt differently"):
        rollout(ad, recs[:2], loader, cfg, k=3, seed=5, backend="vllm", vllm_engine=bad)


def test_image_placeholders_are_never_sampled(data):
    root, recs = data
    model, processor = build_tiny("qwen2_vl")
    ad = adapter_for(model.eval(), processor)
    calls = []
    orig = model.lm_head.forward

    def boosted(h):  # make the image placeholder by far the model's favourite token
        out = orig(h)
        out[..., ad.image_token_id] += 50.0
        calls.append(1)
        return out
    model.lm_head.forward = boosted
    b = rollout(ad, recs[:2], ImageLoader(ad, root), SAMPLE, k=2, seed=0)
    assert calls and not (b.response_ids == ad.image_token_id).any()
    # its probability mass is still part of the policy's log-probs (it was only not drawn)
    assert (b.logprobs[b.response_mask] < -40).all()
    assert _masked_close(sequence_logprobs(ad, b, encoded=b.encoded), b.logprobs, b.response_mask, 1e-4)
