"""Rollouts for online RL: k sampled responses per prompt, with the log-probs they were drawn with.

    batch = rollout(adapter, records, loader, SamplingConfig(temperature=1.0, max_new_tokens=64), k=8, seed=0)
    new_lp = sequence_logprobs(adapter, batch, with_grad=True)           # (N*k, T), policy being trained
    ratio = (new_lp - batch.logprobs).exp()                              # PPO/GRPO importance ratio

**Layout of a** :class:`RolloutBatch` (N prompts x k samples = R rows; the rows of prompt i are
``i*k .. i*k+k-1`` and ``group_ids`` says so):

* ``prompt_ids`` (R, Lp) LEFT-padded, ``response_ids`` (R, T) RIGHT-padded, so every row's
  response starts at column Lp of ``input_ids = cat(prompt_ids, response_ids)``. The logit
  that predicts response token j of any row sits at position Lp - 1 + j.
* ``response_mask`` (R, T) is True on the response tokens up to AND INCLUDING the stop token
  (EOS or one of the family's stop ids); nothing after it. ``finished`` (R,) is True where the
  row stopped on a stop token and False where it ran into ``max_new_tokens``.
* Images: each unique image of the batch is encoded ONCE (``encoded``); the k samples of a
  prompt, and every other prompt that shows the same image, use the same features through
  ``image_indices[row]`` (unique on (image, encoder prompt) for InstructBLIP, like training
  batches).

**Log-probs.** Token choice happens in a logits processor inside HF ``generate`` (which keeps
the KV cache, left-padding positions and M-RoPE bookkeeping); HF then only takes the argmax of
the one-hot scores the processor returns. The processor sees the model's raw fp32 logits
``z`` and records, for the token it draws:

* ``logprobs = log_softmax(z / T)[token]``: the temperature-scaled, UNFILTERED policy
  distribution. This is what :func:`sequence_logprobs` recomputes (it divides by the same T)
  and what PPO/GRPO importance ratios compare against. At temperature 0 (greedy) T counts as 1.
* ``sampling_logprobs``: the log-probability under the distribution actually sampled from,
  after temperature, top-k and top-p (renormalised over the kept tokens). Equal to ``logprobs``
  when top-k and top-p are off, up to the (normally negligible) mass of the image placeholder
  ids, which are never sampled; 0 for greedy decoding (a point mass).

Filtering order: image placeholder ids removed (a generated placeholder would claim image
features that do not exist, so the response could not be scored), temperature, then top-k
(every token whose logit ties the k-th largest is kept), then top-p (the smallest prefix of
tokens sorted by probability whose mass reaches p; at least one token). The model's own
generation config (repetition penalty, n-gram blocking, suppressed tokens, ...) is set aside
during a rollout, so the sampled distribution is the policy's, which the log-probs describe.

**Positions.** Generate derives position ids from the attention mask (``cumsum - 1``; for
Qwen2-VL, M-RoPE t/h/w ids from the mask, ``image_grid_thw`` and ``mm_token_type_ids``);
:func:`sequence_logprobs` takes them from ``adapter.position_ids``, which calls the same model
method, so a left-padded row is scored at the positions it was sampled at. (1-D RoPE only sees
position differences, so a plain forward that counts padding would give the same logits there;
what must be right is M-RoPE, where image tokens take t/h/w positions rather than a running
count, and absolute position embeddings.) Tests: recomputed == sampling-time log-probs within
1e-4 in fp32 for LLaVA and Qwen2-VL with left-padded multi-image prompts.

**Determinism.** Sampling draws from a ``torch.Generator`` seeded with ``seed`` on the model's
device; the global RNG is neither used nor advanced (with ``seed=None`` one seed is drawn from
the global RNG, so ``torch.manual_seed`` upstream still fixes the result; the seed used is
kept in ``batch.seed``). Same model, records, config, ``batch_size``, seed and device give
the same tokens. The model runs in eval mode during generation (dropout off); recompute
log-probs in eval mode too (or with dropout disabled) for them to match.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ..data.batching import Example, ImageLoader, image_prompts, pad, unique_images
from ..errors import DataError, VlmalignError
from ..losses.logps import token_logps
from ..models.adapter import PrefixNotShared
from .generate import SamplingConfig

BACKENDS = ("hf", "vllm")


class RolloutError(VlmalignError):
    """A rollout that cannot be run as asked (missing backend, bad settings, bad records)."""


# ---------------------------------------------------------------------- the batch
@dataclass
class RolloutBatch:
    """N prompts x k sampled responses (R = N*k rows), ready for a training forward.

    Tensors live on the model's device. ``group_ids[r]`` indexes ``records`` (the prompt row r
    answers); a :meth:`select`-ed batch keeps the full ``records`` list and the original ids.
    """

    records: list                  # the N source records (or message lists), in order
    k: int                         # samples per prompt
    prompt_ids: torch.Tensor       # (R, Lp) long, left-padded with the pad id
    prompt_mask: torch.Tensor      # (R, Lp) long, 1 on real prompt tokens
    response_ids: torch.Tensor     # (R, T) long, right-padded with the pad id
    response_mask: torch.Tensor    # (R, T) bool, response tokens up to and including the stop token
    logprobs: torch.Tensor         # (R, T) fp32, log_softmax(z / temperature)[token]; 0 where masked
    sampling_logprobs: torch.Tensor  # (R, T) fp32, under the filtered (top-k/top-p) distribution
    finished: torch.Tensor         # (R,) bool, stopped on a stop token (False: hit max_new_tokens)
    group_ids: torch.Tensor        # (R,) long, index into ``records``
    texts: list[str]               # (R) decoded responses (special tokens and the stop token left out)
    images: list                   # unique ImageInputs of the batch
    image_prompts: list            # per unique image, its encoder prompt (None for most families)
    image_indices: list[list[int]]  # per row, the images its placeholders use (into ``images``)
    encoded: Any                   # EncodedImages of ``images`` at sampling time (None: text only)
    temperature: float             # temperature of ``logprobs`` (1.0 for greedy)
    config: SamplingConfig
    seed: int
    pad_token_id: int

    @property
    def num_rows(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        """Lp: the column where every row's response starts."""
        return int(self.prompt_ids.shape[1])

    @property
    def input_ids(self) -> torch.Tensor:
        """(R, Lp + T) prompt + response: left padding, then right padding."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(R, Lp + T) long: 1 on prompt tokens and on response tokens up to the stop token."""
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(R,) response tokens per row (the stop token included)."""
        return self.response_mask.sum(1)

    def encode(self, adapter):
        """Encode the batch's unique images once with ``adapter`` (None for text-only batches)."""
        if not self.images:
            return None
        return adapter.encode_images(self.images, prompts=self.image_prompts)

    def select(self, rows: Sequence[int] | torch.Tensor) -> "RolloutBatch":
        """The sub-batch of ``rows`` (micro-batches for a trainer): only the images those rows use
        (``encoded`` sliced, not recomputed) and padding columns no selected row needs dropped."""
        idx = torch.as_tensor(list(rows) if not torch.is_tensor(rows) else rows, dtype=torch.long)
        if idx.numel() == 0:
            raise RolloutError("select() needs at least one row")
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_rows:
            raise RolloutError(f"select(): row indices must lie in [0, {self.num_rows}), got {idx.tolist()}")
        dev = self.response_ids.device
        rows_l = idx.tolist()
        used = sorted({i for r in rows_l for i in self.image_indices[r]})
        remap = {old: new for new, old in enumerate(used)}
        encoded = self.encoded
        if encoded is not None:
            from ..models.adapter import EncodedImages
            sel = torch.as_tensor(used, dtype=torch.long)
            encoded = EncodedImages(features=[encoded.features[i] for i in used],
                                    extras={k: v[sel.to(v.device)] for k, v in encoded.extras.items()})
            if not used:
                encoded = None
        di = idx.to(dev)
        pm, rm = self.prompt_mask[di], self.response_mask[di]
        left = int((pm.sum(1)).max())                        # prompt columns still needed
        right = int(rm.sum(1).max()) if rm.numel() else 0    # response columns still needed
        Lp = self.prompt_length
        return replace(
            self,
            prompt_ids=self.prompt_ids[di, Lp - left:], prompt_mask=pm[:, Lp - left:],
            response_ids=self.response_ids[di, :right], response_mask=rm[:, :right],
            logprobs=self.logprobs[di, :right], sampling_logprobs=self.sampling_logprobs[di, :right],
            finished=self.finished[di], group_ids=self.group_ids[di], texts=[self.texts[r] for r in rows_l],
            images=[self.images[i] for i in used], image_prompts=[self.image_prompts[i] for i in used],
            image_indices=[[remap[i] for i in self.image_indices[r]] for r in rows_l], encoded=encoded)


# ---------------------------------------------------------------------- sampling
def filter_logits(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering of (R, V) logits: dropped entries become -inf.

    top-k keeps every logit >= the k-th largest (ties kept); top-p keeps, per row, the tokens
    sorted by probability until their mass reaches ``top_p`` (a token is kept when the mass
    BEFORE it is < top_p, so the most likely token always stays).
    """
    V = z.shape[-1]
    if top_k and 0 < top_k < V:
        kth = z.topk(top_k, dim=-1).values[:, -1:]                       # (R, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)               # (R, V)
        p = torch.softmax(sorted_z, dim=-1)
        before = p.cumsum(-1) - p                                        # mass of the tokens ranked above
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


class _Sampler:
    """HF logits processor that draws the next token itself and records its log-probs.

    Called by ``generate`` with the raw fp32 logits (R, V) of the last position; returns scores
    that are 0 on the drawn token and -inf elsewhere, so the greedy search HF runs picks it.
    """

    def __init__(self, cfg: SamplingConfig, generator: torch.Generator | None, banned: Sequence[int] = (),
                 row_generators: Sequence[torch.Generator] | None = None):
        self.row_generators = list(row_generators) if row_generators is not None else None
        self.banned = sorted(set(int(b) for b in banned))
        self.greedy = not (cfg.temperature and cfg.temperature > 0)
        self.temperature = 1.0 if self.greedy else float(cfg.temperature)
        self.top_k = int(cfg.top_k or 0)
        self.top_p = float(cfg.top_p if cfg.top_p is not None else 1.0)
        self.generator = generator
        self.tokens: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self.sampling_logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        z = scores.float()
        if self.temperature != 1.0:
            z = z / self.temperature
        logp = torch.log_softmax(z, dim=-1)                               # (R, V) the policy's
        zs = z
        if self.banned:  # image placeholders: a generated one would not match any image features
            zs = z.clone()
            zs[:, self.banned] = float("-inf")
        if self.greedy:
            tok = zs.argmax(dim=-1)                                       # (R,)
            slp = torch.zeros(tok.shape, dtype=torch.float32, device=z.device)
        else:
            logq = torch.log_softmax(filter_logits(zs, self.top_k, self.top_p), dim=-1)
            probs = logq.exp()
            if self.row_generators is not None:   # one stream per row: a row's draws ignore the others
                tok = torch.cat([torch.multinomial(probs[r:r + 1], 1, generator=g).squeeze(1)
                                 for r, g in enumerate(self.row_generators)])
            else:
                tok = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            slp = logq.gather(1, tok[:, None]).squeeze(1)
        self.tokens.append(tok)
        self.logprobs.append(logp.gather(1, tok[:, None]).squeeze(1))
        self.sampling_logprobs.append(slp)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tok[:, None], 0.0)


@contextlib.contextmanager
def _plain_generation_configs(model, eos: list[int], pad_id: int):
    """Set aside the generation configs of ``model`` and its submodules (InstructBLIP generates
    with its language model's) for configs that add no logits processors of their own."""
    from transformers import GenerationConfig
    saved = []
    for mod in model.modules():
        gc = getattr(mod, "generation_config", None)
        if isinstance(gc, GenerationConfig):
            saved.append((mod, gc))
    try:
        for mod, gc in saved:
            mod.generation_config = GenerationConfig(bos_token_id=gc.bos_token_id, eos_token_id=list(eos),
                                                     pad_token_id=pad_id,
                                                     decoder_start_token_id=gc.decoder_start_token_id)
        yield
    finally:
        for mod, gc in saved:
            mod.generation_config = gc


# ---------------------------------------------------------------------- rollout
def _where(rec, i: int) -> str:
    """``FILE: record N`` for error messages (the position in ``records`` where no index is known)."""
    src, idx = getattr(rec, "source", None), getattr(rec, "index", None)
    return DataError("", file=src, index=i if idx is None else idx).format().rstrip(": ")


def _located(e: DataError, rec, i: int) -> DataError:
    """``e`` with the record's file and index filled in, keeping its class (LengthError stays one)."""
    idx = getattr(rec, "index", None)
    loc = e.located(file=getattr(rec, "source", None), index=i if idx is None else idx)
    return type(e)(loc.reason, file=loc.file, index=loc.index, field=loc.field)


def _tokenized(adapter, loader, rec, i: int, max_prompt_length, *, pil: bool = False):
    """``(messages, image refs, tokenized prompt, PIL images or None)`` of record ``rec`` (position
    ``i``); a bad image or an over-long prompt raises naming the record."""
    msgs = _prompt_of(rec, i)
    refs = [img for m in msgs for img in m.images]
    try:
        imgs = [loader.inputs(r) for r in refs]
        t = adapter.tokenize_prompt(msgs, imgs, max_length=max_prompt_length)
        images = [loader.pil(r) for r in refs] if pil else None
    except DataError as e:
        raise _located(e, rec, i) from None
    return msgs, refs, t, images


def _prompt_of(rec, i: int):
    if isinstance(rec, (list, tuple)):
        return list(rec)
    msgs = getattr(rec, "prompt", None)
    if msgs is None:
        raise RolloutError(f"{_where(rec, i)}: field 'prompt': a {type(rec).__name__} has no prompt to roll out "
                           "(use RL prompt, preference, ranked or unpaired records, or message lists)")
    return msgs


def rollout(adapter, records: Sequence, loader: ImageLoader, cfg: SamplingConfig | None = None,
            k: int | None = None, *, seed: int | None = None, batch_size: int | None = None,
            max_prompt_length: int | None = None, backend: str = "hf", vllm_engine=None,
            row_seeds: Sequence[int] | None = None, synced: bool = False,
            share_prefill: bool = False) -> RolloutBatch:
    """Sample ``k`` responses (default ``cfg.num_samples``) for each record's prompt.

    ``records``: RL prompts (or any record with a ``prompt``, or plain message lists).
    ``batch_size``: prompts per ``generate`` call (default: all at once); images are still
    encoded once for the whole call. ``max_prompt_length``: raise ``LengthError`` naming the
    record for longer prompts (never truncated). ``backend="vllm"`` samples with a vLLM engine
    you pass as ``vllm_engine`` (see :func:`_vllm_rollout`); it needs vllm and CUDA.
    ``row_seeds``: one seed per sampled row (``len(records) * k``, the rows of record i at
    ``i*k .. i*k+k-1``); each row then draws from its own generator, so its tokens do not depend
    on which other rows share the batch (the online loop seeds by the prompt's place in the
    step, so a prompt's samples are the same whichever process draws them). ``seed`` is then
    only recorded. HF backend only. ``synced``: HF's ``synced_gpus``: a process whose rows have
    all stopped keeps running forwards until every process's have (a model sharded with FSDP2
    needs every process in each forward); every process must then call with the same number
    of generate calls. ``share_prefill``: each prompt's columns but the last run once and their
    key/value cache is copied to its k rows before ``generate`` samples (the caller checks that
    the model allows it: ``adapter.prefix_sharing_problem()`` and ``adapter.prefill_sharing``;
    a chunk that cannot, e.g. a prompt ending in an image token, prefills every row).
    """
    cfg = cfg or SamplingConfig()
    k = cfg.num_samples if k is None else int(k)
    if backend not in BACKENDS:
        raise RolloutError(f"unknown rollout backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if k < 1:
        raise RolloutError(f"k (samples per prompt) must be >= 1, got {k}")
    if cfg.max_new_tokens < 1:
        raise RolloutError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.top_p is not None and not 0.0 < cfg.top_p <= 1.0:
        raise RolloutError(f"top_p must lie in (0, 1], got {cfg.top_p}")
    if cfg.top_k is not None and cfg.top_k < 0:
        raise RolloutError(f"top_k must be >= 0 (0: off), got {cfg.top_k}")
    if cfg.temperature is not None and cfg.temperature < 0:
        raise RolloutError(f"temperature must be >= 0 (0: greedy), got {cfg.temperature}")
    if not records:
        raise RolloutError("rollout() got no records")
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    if row_seeds is not None and len(row_seeds) != len(records) * k:
        raise RolloutError(f"row_seeds: {len(row_seeds)} seeds for {len(records)} prompts x k={k} rows")
    if backend == "vllm":
        if row_seeds is not None:
            raise RolloutError("row_seeds (one generator per row) is for the hf backend; vllm seeds per request")
        return _vllm_rollout(adapter, list(records), loader, cfg, k, seed=seed, engine=vllm_engine,
                             max_prompt_length=max_prompt_length)

    # tokenize every prompt once (errors name the record), then k rows per prompt
    items: list[Example] = []
    for i, rec in enumerate(records):
        msgs, refs, t, _ = _tokenized(adapter, loader, rec, i, max_prompt_length)
        eps = image_prompts(msgs, adapter)
        items.extend(Example(rows={"input_ids": t.input_ids}, images=refs, image_prompts=eps, record=rec)
                     for _ in range(k))
    uniq, per_row, uprompts = unique_images(items, loader)
    dev = adapter.device
    model = adapter.model
    tok = adapter.tokenizer
    stops = adapter.stop_token_ids()
    if not stops:
        raise RolloutError(f"{adapter.family}: the model has no EOS / stop token ids; responses could not stop")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    generator = torch.Generator(device=dev).manual_seed(seed)
    row_gens = None if row_seeds is None else \
        [torch.Generator(device=dev).manual_seed(int(x) % (2 ** 63)) for x in row_seeds]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            enc = adapter.encode_images(uniq, prompts=uprompts) if uniq else None
            per = (batch_size or len(records)) * k
            parts = [_generate_rows(adapter, items[s:s + per], per_row[s:s + per], enc, cfg, generator,
                                    stops, pad_id, None if row_gens is None else row_gens[s:s + per], synced,
                                    k=k, share_prefill=share_prefill)
                     for s in range(0, len(items), per)]
    finally:
        if was_training:
            model.train()

    R = len(items)
    prompts = [it.rows["input_ids"] for it in items]          # chunks may differ in padded width
    prompt_ids = pad(prompts, pad_id, side="left")
    prompt_mask = pad([[1] * len(x) for x in prompts], 0, side="left")
    T = max(p[2].shape[1] for p in parts)

    def _right(j, value, dtype):
        out = torch.full((R, T), value, dtype=dtype, device=dev)
        s = 0
        for p in parts:
            n, t = p[j].shape
            out[s:s + n, :t] = p[j]
            s += n
        return out

    response_ids = _right(2, pad_id, torch.long)
    response_mask = _right(3, False, torch.bool)
    logprobs = _right(4, 0.0, torch.float32)
    sampling_logprobs = _right(5, 0.0, torch.float32)
    finished = torch.cat([p[6] for p in parts])
    lengths = response_mask.sum(1).tolist()
    fin = finished.tolist()
    texts = [s.strip() for s in tok.batch_decode(
        [response_ids[r, :lengths[r] - (1 if fin[r] else 0)].tolist() for r in range(R)],
        skip_special_tokens=True)]
    greedy = not (cfg.temperature and cfg.temperature > 0)
    return RolloutBatch(
        records=list(records), k=k, prompt_ids=prompt_ids.to(dev), prompt_mask=prompt_mask.to(dev),
        response_ids=response_ids, response_mask=response_mask, logprobs=logprobs,
        sampling_logprobs=sampling_logprobs, finished=finished,
        group_ids=torch.arange(len(records), device=dev).repeat_interleave(k), texts=texts, images=uniq,
        image_prompts=uprompts, image_indices=per_row, encoded=enc,
        temperature=1.0 if greedy else float(cfg.temperature), config=cfg, seed=seed, pad_token_id=pad_id)


def banned_token_ids(adapter) -> list[int]:
    """Image / video placeholder ids, never sampled: the model's forward counts them as image
    slots, so a response holding one could not be scored (features and tokens would not match)."""
    ids = {getattr(adapter, "image_token_id", None), getattr(adapter, "placeholder_id", None),
           getattr(adapter, "video_token_id", None)}
    return sorted(i for i in ids if i is not None)


def response_stop_mask(seq: torch.Tensor, stops: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, T) generated ids -> (mask (R, T) bool up to and including the first stop id, finished (R,))."""
    is_stop = torch.isin(seq, torch.as_tensor(list(stops), device=seq.device))
    finished = is_stop.any(dim=1)
    T = seq.shape[1]
    first = torch.where(finished, is_stop.long().argmax(dim=1), torch.full_like(finished, T - 1, dtype=torch.long))
    mask = torch.arange(T, device=seq.device).unsqueeze(0) <= first.unsqueeze(1)
    return mask, finished


def _prompt_cache(adapter, ids, mask, pos, row_prompt, encoded, image_indices):
    """The key/value cache of every column but the last of left-padded prompt rows ``ids`` (R, Lp),
    each distinct prompt run once and indexed out to its rows (``VLMAdapter.prompt_cache``):
    ``row_prompt[r]`` numbers row r's prompt (0, 1, ... in order of first appearance); ``pos``: the
    rows' position ids (their first Lp columns are the prompt's). Raises :class:`PrefixNotShared`
    where the rows do not allow it."""
    R, Lp = ids.shape
    if Lp < 2 or not bool(mask[:, -1].all()):
        raise PrefixNotShared("a prompt has fewer than 2 tokens")
    if pos is None or pos.dim() != 2:
        raise PrefixNotShared("the model takes no 1-D position ids")
    order = row_prompt.tolist()
    rep = [order.index(p) for p in range(max(order) + 1)]                 # one row per distinct prompt
    rep_t = torch.as_tensor(rep, device=ids.device)
    if not torch.equal(ids[rep_t][row_prompt], ids):
        raise PrefixNotShared("rows of one group hold different prompts")
    return adapter.prompt_cache(ids[rep_t, :-1], mask[rep_t, :-1], row_prompt, ids[rep_t, -1], encoded=encoded,
                                image_indices=[image_indices[r] for r in rep], position_ids=pos[rep_t, :Lp - 1])


def _prefill(adapter, ids, mask, per_row, enc, k: int):
    """:func:`_prompt_cache` for a generate call whose rows are ``k`` consecutive copies of each
    prompt; None where it does not apply (then generate prefills every row itself)."""
    R = ids.shape[0]
    if k < 2 or R % k:
        return None
    try:
        pos = adapter.position_ids(ids, mask, encoded=enc, image_indices=per_row)
        return _prompt_cache(adapter, ids, mask, pos, torch.arange(R, device=ids.device) // k, enc, per_row)
    except PrefixNotShared:
        return None


def _generate_rows(adapter, items, per_row, enc, cfg, generator, stops, pad_id, row_generators=None,
                   synced: bool = False, k: int = 1, share_prefill: bool = False):
    """One HF ``generate`` call over ``items`` (already k-expanded); ``row_generators``: one per row.
    ``share_prefill``: run each prompt once and give its key/value cache to its k rows
    (:func:`_prefill`; the caller checks that the model allows it)."""
    dev = adapter.device
    ids = pad([it.rows["input_ids"] for it in items], pad_id, side="left").to(dev)
    mask = pad([[1] * len(it.rows["input_ids"]) for it in items], 0, side="left").to(dev)
    sampler = _Sampler(cfg, generator, banned_token_ids(adapter), row_generators)
    cache = _prefill(adapter, ids, mask, per_row, enc, k) if share_prefill else None
    from transformers import LogitsProcessorList
    with _plain_generation_configs(adapter.model, stops, pad_id):
        out = adapter.generate(ids, mask, encoded=enc, image_indices=per_row, max_new_tokens=cfg.max_new_tokens,
                               do_sample=False, use_cache=True, eos_token_id=list(stops), pad_token_id=pad_id,
                               logits_processor=LogitsProcessorList([sampler]),
                               **({"cache": cache} if cache is not None else {}),
                               **({"synced_gpus": True} if synced else {}))
    seq = adapter.new_tokens(out, ids)
    n = seq.shape[1]
    if n == 0 or len(sampler.tokens) < n:
        raise RolloutError(f"{adapter.family}: generate returned {n} new tokens but the sampler ran "
                           f"{len(sampler.tokens)} steps")
    drawn = torch.stack(sampler.tokens[:n], dim=1)                       # (R, n)
    lp = torch.stack(sampler.logprobs[:n], dim=1)
    slp = torch.stack(sampler.sampling_logprobs[:n], dim=1)
    rmask, finished = response_stop_mask(seq, stops)
    if not torch.equal(seq[rmask], drawn[rmask]):
        raise RolloutError(f"{adapter.family}: generate did not emit the tokens the sampler drew "
                           "(another logits processor or a custom generate changed them)")
    seq = seq.masked_fill(~rmask, pad_id)
    return (ids, mask, seq, rmask, lp.masked_fill(~rmask, 0.0), slp.masked_fill(~rmask, 0.0), finished)


# ---------------------------------------------------------------------- recomputation
def _response_forward(adapter, batch: RolloutBatch, encoded, *, hidden: bool, keep: int | None = None):
    """Forward over prompt + response. Callers read the T + 1 last positions (the first T
    predict the response tokens; counted from the end, so families that prepend query tokens
    to the text, like InstructBLIP, line up too); logits are built for ``keep`` positions
    (default T + 1)."""
    ids, mask = batch.input_ids, batch.attention_mask
    T = batch.response_ids.shape[1]
    kw = {}
    pos = adapter.position_ids(ids, mask, encoded=encoded, image_indices=batch.image_indices)
    if pos is not None:
        kw["position_ids"] = pos
    if hidden:
        kw["output_hidden_states"] = True
    return adapter.forward(ids, mask, encoded=encoded, image_indices=batch.image_indices, use_cache=False,
                           logits_to_keep=T + 1 if keep is None else keep, **kw)


_noted: set[str] = set()


def _shared_response_forward(adapter, batch: RolloutBatch, encoded, *, hidden: bool):
    """:func:`_response_forward`'s numbers with each prompt run once for its group's rows.

    The distinct prompts of the batch (one per group id) run without their last token; their
    key/value cache is indexed out to the rows that continue them, and each row runs ``[last
    prompt token] + response[:-1]`` on top at the positions the whole row would give them.
    Gradients flow through the cache. Rows are left-padded, so the last prompt token sits in the
    last prompt column of every row. Returns an output whose ``logits`` (R, T, V) predict the
    response tokens (and whose hidden states are those positions'); raises :class:`PrefixNotShared`
    where this batch does not allow it."""
    ids, mask = batch.prompt_ids, batch.prompt_mask
    Lp, T = ids.shape[1], batch.response_ids.shape[1]
    pos = adapter.position_ids(batch.input_ids, batch.attention_mask, encoded=encoded,
                               image_indices=batch.image_indices)
    first: dict[int, int] = {}
    row_prompt = torch.as_tensor([first.setdefault(g, len(first)) for g in batch.group_ids.tolist()],
                                 device=ids.device)
    cache = _prompt_cache(adapter, ids, mask, pos, row_prompt, encoded, batch.image_indices)
    last = ids[:, -1]
    cont = torch.cat([last.unsqueeze(1), batch.response_ids[:, :-1]], dim=1)          # (R, T)
    full_mask = torch.cat([mask, batch.response_mask[:, :-1].long()], dim=1)          # (R, Lp - 1 + 1 + T - 1)
    kw = {"output_hidden_states": True} if hidden else {}
    return adapter.forward(cont, full_mask, cache=cache, position_ids=pos[:, Lp - 1:Lp - 1 + T],
                           use_cache=True, **kw)


def _logits_and_hidden(adapter, batch: RolloutBatch, enc, *, hidden: bool, share_prefix: bool):
    """(R, T, V) logits predicting the response tokens and, with ``hidden``, the (R, T, H) final
    hidden states there; from the prefix-shared forward where asked and possible."""
    from ..models.scalar_head import final_hidden_state
    T = batch.response_ids.shape[1]
    if share_prefix:
        try:
            out = _shared_response_forward(adapter, batch, enc, hidden=hidden)
            return out.logits, (final_hidden_state(out) if hidden else None)
        except PrefixNotShared as e:
            msg = f"prefix sharing skipped for a batch: {e}; using the unshared forward"
            if msg not in _noted:
                _noted.add(msg)
                import logging
                logging.getLogger(__name__).warning(msg)
    out = _response_forward(adapter, batch, enc, hidden=hidden)
    return out.logits[:, :-1], (final_hidden_state(out)[:, -(T + 1):-1] if hidden else None)


def sequence_logprobs(adapter, batch: RolloutBatch, encoded=None, with_grad: bool = False, *,
                      temperature: float | None = None, return_hidden: bool = False,
                      share_prefix: bool = False):
    """Per-token log-probs (R, T) of the batch's response tokens under ``adapter``'s model.

    A training-style forward over ``batch.input_ids`` (left-padded prompt + right-padded
    response) with position ids taken from the attention mask exactly as at sampling time.
    ``log_softmax(logits / temperature)`` (default ``batch.temperature``, as for
    ``batch.logprobs``), 0 where ``response_mask`` is off. ``encoded``: features to use (e.g.
    ``batch.encoded`` when the vision tower and projector are frozen); None encodes the batch's
    unique images once with this adapter (under grad when ``with_grad``). ``return_hidden``:
    also return the final hidden states (R, T, H) at the positions that predict each response
    token (the input of a value head). ``share_prefix``: run each group's prompt once and
    continue its key/value cache for the group's rows (:func:`_shared_response_forward`; the
    caller checks that the model allows it, ``adapter.prefix_sharing_problem()``); a batch that
    cannot falls back to the whole-row forward, logged once per reason.
    """
    t = batch.temperature if temperature is None else float(temperature)
    if t <= 0:
        raise RolloutError(f"temperature for log-probs must be > 0, got {t}")
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with ctx:
        enc = batch.encode(adapter) if encoded is None else encoded
        logits, h = _logits_and_hidden(adapter, batch, enc, hidden=return_hidden, share_prefix=share_prefix)
        if t != 1.0:
            logits = logits / t
        lp = token_logps(logits, batch.response_ids).masked_fill(~batch.response_mask, 0.0)
        return (lp, h) if return_hidden else lp


def sequence_values(value_model, batch: RolloutBatch, encoded=None, with_grad: bool = False) -> torch.Tensor:
    """Per-token values (R, T) of a :class:`~vlmalign.models.ScalarModel` (kind "value") at the
    positions that predict each response token: ``values[r, j]`` is V(prompt + response[:j]),
    the state before response token j. 0 where ``response_mask`` is off."""
    adapter = value_model.adapter
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with ctx:
        enc = batch.encode(adapter) if encoded is None else encoded
        out = _response_forward(adapter, batch, enc, hidden=False, keep=1)   # values need no logits
        T = batch.response_ids.shape[1]
        return out.values[:, -(T + 1):-1].masked_fill(~batch.response_mask, 0.0)


# ---------------------------------------------------------------------- vLLM (optional)
def require_vllm():
    """The ``vllm`` module, or a RolloutError naming what is missing (the package, CUDA)."""
    missing = []
    try:
        import vllm
    except ImportError:
        vllm = None
        missing.append("the vllm package (pip install vllm; vlmalign does not depend on it)")
    if not torch.cuda.is_available():
        missing.append("a CUDA device (torch.cuda.is_available() is False)")
    if missing:
        raise RolloutError("rollout backend 'vllm' needs " + " and ".join(missing) +
                           "; the default backend 'hf' runs anywhere")
    return vllm


def _vllm_rollout(adapter, records, loader, cfg, k, *, seed, engine, max_prompt_length) -> RolloutBatch:
    """Sample with ``engine`` (a ``vllm.LLM`` holding the CURRENT policy weights: vlmalign does
    not copy weights into vLLM, so a trainer reloads or syncs them itself).

    Prompts go to vLLM as the rendered chat template plus PIL images; the prompt ids vLLM
    reports must equal ours (else RolloutError), so the batch is scored on exactly what was
    sampled. ``logprobs`` are recomputed with ``adapter`` (:func:`sequence_logprobs`, one no-grad
    forward) so they mean the same as with the HF backend; ``sampling_logprobs`` are the ones
    vLLM returns (what they are depends on the engine's ``logprobs_mode``: the default
    ``raw_logprobs`` is before temperature and filtering, ``processed_logprobs`` after). Where
    vLLM leaves a stop token out of its output (``stop_reason`` holds its id), it is appended,
    with its recomputed log-prob as its sampling log-prob.
    """
    vllm = require_vllm()
    if engine is None:
        raise RolloutError("rollout backend 'vllm' needs vllm_engine=vllm.LLM(model=<directory of the current "
                           "policy weights>, ...)")
    stops = adapter.stop_token_ids()
    tok = adapter.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    greedy = not (cfg.temperature and cfg.temperature > 0)
    prompts, ours, items = [], [], []
    for i, rec in enumerate(records):
        msgs, refs, t, pil = _tokenized(adapter, loader, rec, i, max_prompt_length, pil=True)
        req = {"prompt": adapter.render(msgs, add_generation_prompt=True)}
        if pil:
            req["multi_modal_data"] = {"image": pil if len(pil) > 1 else pil[0]}
        prompts.append(req)
        ours.append(list(t.input_ids))
        items.extend(Example(rows={"input_ids": t.input_ids}, images=refs,
                             image_prompts=image_prompts(msgs, adapter), record=rec) for _ in range(k))
    params = vllm.SamplingParams(n=k, temperature=0.0 if greedy else float(cfg.temperature),
                                 top_p=float(cfg.top_p), top_k=int(cfg.top_k) if cfg.top_k else -1,
                                 max_tokens=int(cfg.max_new_tokens), stop_token_ids=list(stops), logprobs=0,
                                 seed=int(seed))
    outs = engine.generate(prompts, params, use_tqdm=False)
    rows, slps = [], []
    for i, out in enumerate(outs):
        if list(out.prompt_token_ids) != ours[i]:
            raise RolloutError(f"{_where(records[i], i)}: vLLM tokenized the prompt differently from {adapter.family}'s "
                               f"adapter ({len(out.prompt_token_ids)} vs {len(ours[i])} ids); its samples could not "
                               "be scored on the same sequence")
        if len(out.outputs) != k:
            raise RolloutError(f"vLLM returned {len(out.outputs)} samples for prompt {i}, expected {k}")
        for o in out.outputs:
            ids = list(o.token_ids)
            lps = [float(o.logprobs[j][t].logprob) if o.logprobs else float("nan") for j, t in enumerate(ids)]
            if (o.finish_reason == "stop" and (not ids or ids[-1] not in stops)
                    and isinstance(getattr(o, "stop_reason", None), int)):
                ids.append(int(o.stop_reason))
                lps.append(float("nan"))  # filled from the recomputation below
            if not ids:
                raise RolloutError(f"vLLM returned an empty response for prompt {i}")
            rows.append(ids)
            slps.append(lps)
    dev = adapter.device
    uniq, per_row, uprompts = unique_images(items, loader)
    seq = pad(rows, pad_id).to(dev)
    rmask, finished = response_stop_mask(seq, stops)
    lengths = [len(r) for r in rows]
    within = torch.arange(seq.shape[1], device=dev).unsqueeze(0) < torch.tensor(lengths, device=dev).unsqueeze(1)
    rmask = rmask & within
    slp = torch.zeros(seq.shape, dtype=torch.float32)
    for r, lp in enumerate(slps):
        slp[r, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    slp = slp.to(dev)
    R = len(rows)
    fin = finished.tolist()
    texts = [s.strip() for s in tok.batch_decode(
        [rows[r][:int(rmask[r].sum()) - (1 if fin[r] else 0)] for r in range(R)], skip_special_tokens=True)]
    ids_l = [ours[r // k] for r in range(R)]
    batch = RolloutBatch(
        records=list(records), k=k, prompt_ids=pad(ids_l, pad_id, side="left").to(dev),
        prompt_mask=pad([[1] * len(x) for x in ids_l], 0, side="left").to(dev),
        response_ids=seq.masked_fill(~rmask, pad_id), response_mask=rmask,
        logprobs=torch.zeros(seq.shape, dtype=torch.float32, device=dev), sampling_logprobs=slp,
        finished=finished, group_ids=torch.arange(len(records), device=dev).repeat_interleave(k), texts=texts,
        images=uniq, image_prompts=uprompts, image_indices=per_row, encoded=None,
        temperature=1.0 if greedy else float(cfg.temperature), config=cfg, seed=int(seed), pad_token_id=pad_id)
    with torch.no_grad():
        model = adapter.model
        was_training = model.training
        model.eval()
        try:
            batch.encoded = batch.encode(adapter)
            batch.logprobs = sequence_logprobs(adapter, batch, encoded=batch.encoded)
        finally:
            if was_training:
                model.train()
    missing = torch.isnan(batch.sampling_logprobs)
    batch.sampling_logprobs = torch.where(missing, batch.logprobs, batch.sampling_logprobs).masked_fill(~rmask, 0.0)
    return batch
