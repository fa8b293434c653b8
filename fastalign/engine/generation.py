"""Batched generation from prompts (left-padded) with a KV cache, for evaluation and rollouts.

* :func:`generate` — completion token lists (greedy or plain temperature sampling); what evaluation uses.
* :func:`sample` — a :class:`SampledCompletions` for online RL: token ids, completion masks and the sampling log-probs,
  with temperature, top-p, top-k, a token limit, stop on EOS and on stop strings, ``num_samples`` per prompt.
* :class:`VLLMSampler` — the same ``sample`` interface on vLLM (used when vLLM is installed and a GPU is
  present; see :func:`make_sampler`), with its weight sync.
* :func:`gathered_for_generation` — FSDP2-sharded models keep their full parameters gathered while generating.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
from dataclasses import dataclass

import torch

from fastalign.data.loading import IGNORE_INDEX
from fastalign.models.loading import base_causal_lm, cache_argument


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, *, max_new_tokens, temperature=0.0, batch_size=256, generator=None):
    """Complete each prompt (a list of token ids); greedy when ``temperature == 0``.

    Returns a list of completion token-id lists, cut after the first EOS (EOS kept). The decoding is
    :func:`sample`'s, without the log-probs.
    """
    # The completion mask, not the pad id, says where a completion ends: a model may emit the pad token.
    return sample(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                  batch_size=batch_size, generator=generator).completions()


def decode(tokenizer, completions):
    return [tokenizer.decode(c, skip_special_tokens=True) for c in completions]


# ----------------------------------------------------------------------------------------- rollouts
@dataclass
class SampledCompletions:
    """Sampled completions of a batch of prompts: ``num_samples`` rows per prompt, contiguous.

    ``prompt_ids``/``prompt_mask`` ``[N, P]`` are left-padded; ``completion_ids``/``completion_mask``/``logprobs``
    ``[N, T]`` right-padded. The mask covers each completion up to and including its EOS token or the token
    that completed a stop string (everything when it hit ``max_new_tokens``). ``logprobs`` (fp32, 0 off the
    mask) are the sampling policy's ``log softmax(logits / temperature)`` of each sampled token.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_index: torch.Tensor  # [N] which input prompt each row completes

    def completions(self) -> list[list[int]]:
        """The completion token lists (the masked tokens of each row)."""
        return [row[:int(n)] for row, n in zip(self.completion_ids.tolist(), self.completion_mask.sum(1).tolist())]

    def training_batch(self, pad_id):
        """``(input_ids, attention_mask, labels)`` ``[N, P' + T]`` right-padded for a training forward: each row's
        prompt then its completion, labels ``IGNORE_INDEX`` on prompt and padding. The completion token ``t``
        sits at column ``prompt_len + t``; :func:`completion_positions` gives those columns."""
        lengths = self.prompt_mask.sum(1)
        width = int((lengths + self.completion_mask.sum(1)).max())
        n = self.prompt_ids.shape[0]
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i in range(n):
            p = self.prompt_ids[i][self.prompt_mask[i].bool()]
            c = self.completion_ids[i][self.completion_mask[i].bool()]
            ids[i, :len(p)], ids[i, len(p):len(p) + len(c)] = p, c
            labels[i, len(p):len(p) + len(c)] = c
            mask[i, :len(p) + len(c)] = 1
        return ids, mask, labels


class _SamplingLogprobs:
    """A logits processor that is the whole sampler: it records ``log softmax(logits / T)`` of the step (kept for
    one step only, ``[N, V]``), applies temperature, top-k and top-p, draws the token itself and returns scores
    that are 0 at that token and -inf elsewhere, so HF's greedy step just picks it. HF's own sampling is skipped:
    ``torch.multinomial`` draws an exponential variate for every vocabulary entry (5 ms a step at 8 × 32k on one
    core, 15 % of a rollout), where inverting the CDF with one uniform per row costs a cumulative sum.

    The log-prob of the token sampled at step ``s`` is read at step ``s + 1`` (it is then the last input id), and
    after the loop for the last step — so memory stays ``O(N·V)``, not ``O(N·T·V)``. Greedy (``temperature ==
    0``): the scores pass through unchanged and the log-probs are at temperature 1."""

    def __init__(self, temperature, top_k, top_p, generator=None):
        self.sampling = temperature > 0
        self.temperature = temperature if temperature > 0 else 1.0
        self.top_k, self.top_p = top_k, top_p
        self.generator = generator
        self.previous = None
        self.steps = []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        scaled = scores.float() / self.temperature
        self.previous = torch.log_softmax(scaled, dim=-1)
        if not self.sampling:
            return scores
        truncated = False
        if self.top_k and self.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, self.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            truncated = True
        if self.top_p < 1.0:
            ordered, order = torch.sort(scaled, dim=-1, descending=True)
            before = torch.softmax(ordered, dim=-1).cumsum(-1) - torch.softmax(ordered, dim=-1)
            drop = before >= self.top_p  # keep the smallest prefix whose mass reaches top_p (never the first)
            scaled = scaled.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
            truncated = True
        probs = torch.softmax(scaled, dim=-1) if truncated else self.previous.exp()
        token = _inverse_cdf_draw(probs, self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)

    def finish(self, last_tokens):
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        out = torch.stack(self.steps, dim=1) if self.steps else torch.zeros(last_tokens.shape[0], 0)
        self.previous, self.steps = None, []
        return out


def _inverse_cdf_draw(probs, generator=None):
    """One token per row of ``probs`` ``[N, V]`` (rows need not sum to exactly 1): the first index whose cumulative
    mass exceeds ``u · total`` for ``u ~ U[0, 1)``. The sum runs in float64 so a 256k vocabulary keeps its tail;
    a zero-probability entry is never returned (its cumulative value equals its predecessor's)."""
    cdf = probs.double().cumsum(-1)
    device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=device).to(probs.device)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return token.clamp_(max=probs.shape[-1] - 1)


class _StopOnStrings:
    """A stopping criterion: a row is done once its completion (never the prompt) contains a stop string. Only
    the last ``max len(stop string)`` tokens are decoded each step (a token decodes to at least one character)."""

    def __init__(self, tokenizer, stop_strings, prompt_width):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, stop_strings, prompt_width
        self.tail = max(len(s) for s in stop_strings)

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids[:, self.prompt_width:].tolist():
            text = self.tokenizer.decode(row[-self.tail:], skip_special_tokens=True)
            done.append(any(s in text for s in self.stop_strings))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stop_cut(tokenizer, row, stop_strings) -> int | None:
    """Tokens to keep so the completion ends with the first stop string it contains (None: no stop string)."""
    text = tokenizer.decode(row, skip_special_tokens=True)
    hits = [text.find(s) + len(s) for s in stop_strings if s in text]
    if not hits:
        return None
    end = min(hits)
    lo, hi = 1, len(row)  # the shortest prefix whose text reaches ``end`` characters and holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        prefix = tokenizer.decode(row[:mid], skip_special_tokens=True)
        if len(prefix) >= end and any(s in prefix for s in stop_strings):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _check_sampling(max_new_tokens, temperature, top_p, top_k, num_samples, batch_size):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _check_prompts(prompt_ids):
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError(f"prompt_ids must be a non-empty list of token-id lists, got {type(prompt_ids).__name__}")
    for i, p in enumerate(prompt_ids):
        if not isinstance(p, (list, tuple)) or not p or not all(isinstance(t, int) for t in p):
            raise ValueError(f"prompt_ids[{i}] must be a non-empty list of ints, got {str(p)[:60]!r}")


def _pad_stack(rows, width, value, left=False):
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype if rows else torch.long)
    for i, r in enumerate(rows):
        if left:
            out[i, width - len(r):] = r
        else:
            out[i, :len(r)] = r
    return out


def _sampled_completions(prompts, completions, logps, prompt_index, pad) -> SampledCompletions:
    """A :class:`SampledCompletions` from per-completion tensors: prompts left-padded, completions right-padded."""
    width_p = max(len(p) for p in prompts)
    width_c = max(1, max(len(c) for c in completions))
    ones = lambda rows: [torch.ones(len(r), dtype=torch.long) for r in rows]  # noqa: E731
    return SampledCompletions(prompt_ids=_pad_stack(prompts, width_p, pad, left=True),
                   prompt_mask=_pad_stack(ones(prompts), width_p, 0, left=True),
                   completion_ids=_pad_stack(completions, width_c, pad),
                   completion_mask=_pad_stack(ones(completions), width_c, 0),
                   logprobs=_pad_stack([x.float() for x in logps], width_c, 0.0),
                   prompt_index=torch.tensor(prompt_index))


@torch.no_grad()
def sample(model, tokenizer, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_strings=(),
           num_samples=1, batch_size=256, generator=None) -> SampledCompletions:
    """Sample ``num_samples`` completions of each prompt (token-id lists) with transformers' ``generate`` and a
    KV cache, ``batch_size`` rows a call (whole groups: at least one prompt's samples, whose prompt pass is
    shared); greedy when ``temperature == 0``.

    Sampling log-probs: recorded during generation from the same forward that sampled the token (no
    recompute), as ``log softmax(logits / temperature)`` of the unprocessed logits — the distribution the
    training loss evaluates (temperature 1 when greedy). Top-k/top-p truncation is *not* in them (as in
    TRL and verl): they are the policy's log-probs, not the truncated sampler's. They equal a full
    recompute up to floating-point differences of the cached forward (checked in the tests).

    Stops a row at its first EOS (kept, in the mask) or when its completion text contains one of
    ``stop_strings`` (kept up to the token that completes it; text in the prompt never counts).
    ``generator`` draws the sampling uniforms (the global RNG without one).
    Under FSDP2 call it inside :func:`gathered_for_generation`.
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    _check_prompts(prompt_ids)
    _check_sampling(max_new_tokens, temperature, top_p, top_k, num_samples, batch_size)
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # HF decodes greedily and applies no warper of its own: the processor below is the whole sampler. Long
    # completions get a static (preallocated) KV cache: the growing one re-copies every row's keys and values each
    # step (12 % of a 256-token rollout on CPU), while for a few tokens setting up the static one costs more (10 %
    # slower at 8 tokens). Compiling stays off: the policy's weights change between rollouts.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                              temperature=None, top_k=None, top_p=None, disable_compile=True,
                              cache_implementation="static" if max_new_tokens >= STATIC_CACHE_MIN_TOKENS else None)
    per_call = max(1, batch_size // num_samples)  # whole groups: a prompt's samples share its prompt pass
    prompts, completions, logps, index = [], [], [], []
    for start in range(0, len(prompt_ids), per_call):
        unique = [torch.tensor(list(p)) for p in prompt_ids[start:start + per_call]]
        width = max(len(p) for p in unique)
        ids = _pad_stack(unique, width, pad, left=True).to(device)
        attn = _pad_stack([torch.ones(len(p), dtype=torch.long) for p in unique], width, 0, left=True).to(device)
        cache = _shared_prompt_cache(model, ids, attn, num_samples) if config.cache_implementation is None else None
        ids, attn = ids.repeat_interleave(num_samples, 0), attn.repeat_interleave(num_samples, 0)
        recorder = _SamplingLogprobs(temperature, top_k, top_p, generator)
        # Stop strings are matched in the completion only (HF's own matcher also looks into the prompt).
        stops = StoppingCriteriaList([_StopOnStrings(tokenizer, stop_strings, width)] if stop_strings else [])
        extra = {cache_argument(model): cache} if cache is not None else {}
        seqs = _hf_generate(model, config, input_ids=ids, attention_mask=attn,
                            logits_processor=LogitsProcessorList([recorder]), stopping_criteria=stops, **extra)
        new = seqs[:, width:].cpu()
        lp = recorder.finish(seqs[:, -1]).cpu()
        for i, row in enumerate(new.tolist()):
            cut = row.index(eos) + 1 if eos in row else len(row)
            if stop_strings:
                at = _stop_cut(tokenizer, row[:cut], stop_strings)
                cut = min(cut, at) if at is not None else cut
            prompts.append(unique[i // num_samples])
            index.append(start + i // num_samples)
            completions.append(new[i, :cut])
            logps.append(lp[i, :cut])
    model.train(was_training)
    return _sampled_completions(prompts, completions, logps, index, pad)


def _shared_prompt_cache(model, ids, attn, copies):
    """The KV cache of each prompt's first ``W - 1`` tokens, computed once per prompt and repeated for its
    ``copies`` samples; ``generate`` then runs only the last prompt token per row. Without it the prompt pass
    costs G× (on the tiny GRPO job, 18-token prompts and 8-token completions: two thirds of generation). None
    when there is nothing to share (one sample, one-token prompts) or the model keeps no ``DynamicCache``."""
    from transformers import DynamicCache

    if copies == 1 or ids.shape[1] < 2 or not hasattr(DynamicCache, "batch_repeat_interleave"):
        return None
    cache = DynamicCache()
    mask = attn[:, :-1]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate numbers them
    model(input_ids=ids[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True,
          **{cache_argument(model): cache}, **_logits_to_keep(model))
    cache.batch_repeat_interleave(copies)
    return cache


def _logits_to_keep(lm) -> dict:
    """Ask for the last position's logits only, under the name this transformers version uses (if any)."""
    params = inspect.signature(base_causal_lm(lm).forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def preallocated_cache(lm, max_len):
    """A KV cache written in place: a growing cache re-copies every row's keys/values each step, which with
    many rows costs far more than the forward itself on CPU (measured: 13× the time of one branch of steered
    decoding in ``torch.cat`` alone)."""
    from transformers import DynamicCache, StaticCache

    try:
        return StaticCache(config=base_causal_lm(lm).config, max_cache_len=max_len)
    except TypeError:  # transformers < 4.50 wants the batch size and dtype up front: keep the growing cache there
        return DynamicCache()


STATIC_CACHE_MIN_TOKENS = 64


def _hf_generate(model, config, **inputs):
    """``model.generate`` with the static cache, or with the growing one for a model that has no static cache."""
    try:
        return model.generate(generation_config=config, **inputs)
    except (ValueError, NotImplementedError):
        if config.cache_implementation != "static":
            raise
        config = copy.deepcopy(config)
        config.cache_implementation = None
        return model.generate(generation_config=config, **inputs)


# ------------------------------------------------------------------------------------------ FSDP2
@contextlib.contextmanager
def gathered_for_generation(model):
    """Generate from an FSDP2-sharded model (``fully_shard``): every FSDP module's parameters are all-gathered
    once on entry and kept gathered until exit (no re-shard after each decoding step's forward), so
    ``model.generate`` — which calls the inner causal LM, not the FSDP root's ``forward`` — sees full weights.
    Costs one full copy of the parameters on each process while inside. A collective: every process enters
    it. For a plain or DDP model it does nothing."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import FSDPModule
    from .distributed import initialize_sharding

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield model
        return
    initialize_sharding(model)
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in sharded:
            # Back to the setting fastalign.engine.distributed.shard gave it: inner modules reshard after their
            # forward; a trained root keeps its group gathered (the fused losses read the LM head after it).
            m.set_reshard_after_forward(m is not model or getattr(m, "fastalign_root_reshards", True),
                                        recurse=False)
            m.reshard()


# ------------------------------------------------------------------------------------------- vLLM
class VLLMSampler:
    """:func:`sample` on vLLM (colocated in this process, one engine per policy).

    Built from a saved model folder (``vllm.LLM(model=folder)``); the policy's weights then change every
    step, so call :meth:`load_weights` with ``policy.state_dict()`` after each optimizer step (or every
    ``sync_every`` steps): it hands the tensors to the engine's model runner (``model.load_weights``,
    what TRL's colocate mode does), no disk round trip. vLLM's sampled-token log-probs (``logprobs=0``) are
    the engine's own, from its (bf16/fp16) forward, not a recompute by the policy: the flows recompute
    old log-probs when they need them exactly. Not exercised in CI (no GPU there).
    """

    def __init__(self, model_path, tokenizer, *, dtype="auto", gpu_memory_utilization=0.3, seed=0):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=str(model_path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                       enable_prefix_caching=True)

    def load_weights(self, state_dict):
        """Copy the policy's current weights into the engine (names as in the HF model's ``state_dict``)."""
        weights = [(k, v.detach()) for k, v in state_dict.items()]
        engine = self.llm.llm_engine
        if hasattr(self.llm, "collective_rpc"):  # vLLM >= 0.8 (V1 engine): run on every worker
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(weights))
        else:
            engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sample(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_strings=(),
               num_samples=1, batch_size=0, generator=None) -> SampledCompletions:
        from vllm import SamplingParams, TokensPrompt

        _check_prompts(prompt_ids)
        _check_sampling(max_new_tokens, temperature, top_p, top_k, num_samples, max(batch_size, 1))
        params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                max_tokens=max_new_tokens, stop=list(stop_strings) or None, logprobs=0,
                                include_stop_str_in_output=True,
                                seed=None if generator is None else int(torch.randint(0, 2**31 - 1, (1,),
                                                                                     generator=generator)))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    use_tqdm=False)
        pad = self.tokenizer.pad_token_id
        prompts, completions, logps, index = [], [], [], []
        for i, (p, out) in enumerate(zip(prompt_ids, outputs)):
            for c in out.outputs:
                ids = list(c.token_ids)
                prompts.append(torch.tensor(list(p)))
                completions.append(torch.tensor(ids, dtype=torch.long))
                logps.append(torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids)], dtype=torch.float32))
                index.append(i)
        return _sampled_completions(prompts, completions, logps, index, pad)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class HFSampler:
    """:func:`sample` on the policy itself (transformers ``generate``): nothing to sync, it *is* the policy."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def load_weights(self, state_dict):
        pass

    def sample(self, prompt_ids, **kwargs) -> SampledCompletions:
        return sample(self.model, self.tokenizer, prompt_ids, **kwargs)


def make_sampler(backend, model, tokenizer, model_path=None):
    """A sampler with ``.sample(prompt_ids, **sample kwargs) -> SampledCompletions`` and ``.load_weights(state_dict)``:
    ``"hf"`` (:class:`HFSampler`), ``"vllm"`` (:class:`VLLMSampler`; an error when vLLM or a GPU is missing)
    or ``"auto"`` (vLLM when both are present and ``model_path`` is given, else HF)."""
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"generation backend must be 'auto', 'hf' or 'vllm', got {backend!r}")
    if backend == "vllm" and not vllm_available():
        raise ValueError("generation backend 'vllm' needs vllm installed and a CUDA GPU; use 'hf'")
    if backend == "vllm" or (backend == "auto" and vllm_available() and model_path):
        if not model_path:
            raise ValueError("generation backend 'vllm' needs the model folder it starts from, got none")
        return VLLMSampler(model_path, tokenizer)
    return HFSampler(model, tokenizer)
