"""generation.sample: masks, EOS and stop strings, sampling log-probs against a float64 recompute, top-k/top-p,
groups, seeding, bad input; generate() unchanged; FSDP2 generation with gathered parameters (2 gloo processes)."""

import random
import textwrap

import pytest
import torch
from conftest import one_and_two_processes, rel_err

from fastalign.data import loading
from fastalign.engine import generation
from fastalign.engine.generation import HFSampler, SampledCompletions, generate, make_sampler, sample
from fastalign.models.loading import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_causal_lm("tiny"), load_tokenizer("tiny")


def _prompts(tok, n):
    rng = random.Random()
    texts = [f"{rng.randrange(100)}+{rng.randrange(100)}=" + "x" * rng.randrange(0, 7) for _ in range(n)]
    return [loading.encode_prompt(tok, t) for t in texts]


def _float64_step_logprobs(lm, rollout: SampledCompletions, pad_id, temperature):
    """``log softmax(logits / T)`` of every completion token from one float64 forward over prompt + completion
    (materialized logits), plus the full per-step log-prob rows ``[N, T, V]``."""
    lm64 = load_causal_lm("tiny", dtype="float32").double()
    lm64.load_state_dict({k: v.double() for k, v in lm.state_dict().items()})
    ids, attn, labels = rollout.training_batch(pad_id)
    with torch.no_grad():
        logits = lm64(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
    rows = torch.log_softmax(logits / temperature, dim=-1)
    target = labels[:, 1:]
    m = target != -100
    token = rows.gather(2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return token[m], rows[m]


@pytest.fixture(params=["dynamic", "static"])
def cache_kind(request, monkeypatch):
    """Both KV-cache paths of ``sample``: the growing cache with the shared prompt pass (short completions) and the
    preallocated one (long completions; forced here at any length)."""
    if request.param == "static":
        monkeypatch.setattr(generation, "STATIC_CACHE_MIN_TOKENS", 1)
    return request.param


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 7, 0.8)])
def test_sampling_logprobs_match_a_float64_recompute(tiny, cache_kind, temperature, top_k, top_p):
    lm, tok = tiny
    prompts = _prompts(tok, random.randint(2, 4))
    g = random.randint(1, 3)
    rollout = sample(lm, tok, prompts, max_new_tokens=random.randint(3, 9), temperature=temperature, top_k=top_k,
                     top_p=top_p, num_samples=g, batch_size=random.choice([2, 64]))
    n = len(prompts) * g
    assert rollout.completion_ids.shape == rollout.completion_mask.shape == rollout.logprobs.shape
    assert rollout.completion_ids.shape[0] == n and rollout.logprobs.dtype == torch.float32
    assert rollout.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(g)]
    m = rollout.completion_mask.bool()
    assert torch.isfinite(rollout.logprobs).all() and float(rollout.logprobs[~m].abs().sum()) == 0
    expected, step_rows = _float64_step_logprobs(lm, rollout, tok.pad_token_id, temperature)
    assert rel_err(rollout.logprobs[m], expected) < 1e-5
    # The sampled tokens lie inside the top-k set / the top-p nucleus of their step.
    sampled = rollout.completion_ids[m]
    if top_k:
        rank = (step_rows > step_rows.gather(1, sampled[:, None])).sum(1)
        assert int(rank.max()) < top_k
    if top_p < 1:
        probs = step_rows.exp()
        mass_before = (probs * (probs > probs.gather(1, sampled[:, None]))).sum(1)
        assert float(mass_before.max()) < top_p + 1e-6


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (1.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.5)])
def test_sampled_tokens_follow_the_policy_distribution(tiny, temperature, top_k, top_p):
    """First tokens of many samples of one prompt: their frequencies match softmax(z / T) after the top-k/top-p
    truncation (total variation within sampling noise), so no hidden warper (e.g. HF's default top-k 50 of a
    100-token vocabulary) changes what is sampled."""
    lm, tok = tiny
    with torch.no_grad():  # peakier than the untrained model's near-uniform rows, so the temperature matters
        lm.lm_head.weight.mul_(30.0)
    try:
        prompt = _prompts(tok, 1)
        n = 4000
        rollout = sample(lm, tok, prompt, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                         num_samples=n, batch_size=n, generator=torch.Generator().manual_seed(random.randrange(2**31)))
        with torch.no_grad():
            z = lm(input_ids=torch.tensor([prompt[0]])).logits[0, -1].double() / temperature
    finally:
        with torch.no_grad():
            lm.lm_head.weight.div_(30.0)
    probs = torch.softmax(z, -1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep &= probs >= probs.topk(top_k).values[-1]
    if top_p < 1:
        ordered, order = probs.sort(descending=True)
        keep[order[(ordered.cumsum(0) - ordered) >= top_p]] = False
    target = torch.where(keep, probs, 0.0)
    target /= target.sum()
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=probs.numel()).double()
    assert counts[~keep].sum() == 0
    tv = 0.5 * float((counts / n - target).abs().sum())
    # E[TV] <= 0.5 * sum sqrt(p (1 - p) / n); four times that bound is far beyond sampling noise.
    bound = 0.5 * float((target * (1 - target) / n).sqrt().sum())
    assert tv < 4 * bound + 1e-3, (tv, bound)
    if int(keep.sum()) > 1:  # the logged log-probs are the untruncated policy's
        lp = rollout.logprobs[:, 0].double()
        assert rel_err(lp, torch.log(probs[rollout.completion_ids[:, 0]])) < 1e-4


def test_masks_stop_after_eos_and_prompts_are_left_padded(tiny):
    lm, tok = tiny
    prompts = _prompts(tok, 5)
    rollout = sample(lm, tok, prompts, max_new_tokens=12, temperature=1.5, num_samples=2)
    eos = tok.eos_token_id
    for ids, mask in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n) and n >= 1
        assert eos not in ids[:n - 1]  # nothing after the first EOS is in the mask
        assert ids[n - 1] == eos or n == 12
    for i, p in enumerate(rollout.prompt_ids.tolist()):
        k = len(prompts[rollout.prompt_index[i]])
        assert p[len(p) - k:] == prompts[rollout.prompt_index[i]]
        assert rollout.prompt_mask[i].tolist() == [0] * (len(p) - k) + [1] * k
    assert rollout.completions() == [ids[:sum(m)] for ids, m in zip(rollout.completion_ids.tolist(),
                                                                      rollout.completion_mask.tolist())]


def test_greedy_sample_equals_generate_and_stop_strings_cut(tiny, cache_kind):
    lm, tok = tiny
    prompts = _prompts(tok, 4)
    greedy = sample(lm, tok, prompts, max_new_tokens=10, temperature=0.0)
    assert greedy.completions() == generate(lm, tok, prompts, max_new_tokens=10)
    # Against transformers' own greedy decoding of each prompt alone (no padding, no shared prompt cache).
    grouped = sample(lm, tok, prompts, max_new_tokens=10, temperature=0.0, num_samples=3, batch_size=6)
    for i, p in enumerate(prompts):
        alone = lm.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        alone = alone[:alone.index(tok.eos_token_id) + 1] if tok.eos_token_id in alone else alone
        assert greedy.completions()[i] == alone
        assert grouped.completions()[3 * i:3 * i + 3] == [alone] * 3
    # A stop string taken from inside a greedy completion: the same completion, cut right after its first occurrence.
    text = tok.decode(greedy.completions()[0], skip_special_tokens=True)
    if len(text) < 3:
        pytest.skip("greedy completion too short to hold a stop string")
    stop = text[1:3]
    cut = sample(lm, tok, prompts, max_new_tokens=10, temperature=0.0, stop_strings=[stop])
    first = tok.decode(cut.completions()[0], skip_special_tokens=True)
    assert first == text[:text.index(stop) + len(stop)]
    for full, short in zip(greedy.completions(), cut.completions()):
        assert full[:len(short)] == short
        t = tok.decode(short, skip_special_tokens=True)
        assert stop not in tok.decode(short[:-1], skip_special_tokens=True)
        assert t.endswith(stop) or short == full


def test_a_generated_pad_token_is_kept():
    """A model may emit the pad id: the completion mask, not the token, ends a completion (generate once dropped
    every pad token, so it disagreed with sample() whenever an untrained model's argmax was the pad id)."""
    lm, tok = load_causal_lm("tiny"), load_tokenizer("tiny")
    with torch.no_grad():
        lm.get_output_embeddings().weight.zero_()  # every logit ties: greedy takes token 0, the pad id
    assert tok.pad_token_id == 0 and tok.eos_token_id != 0
    prompts = _prompts(tok, 2)
    want = [[tok.pad_token_id] * 5] * 2
    assert sample(lm, tok, prompts, max_new_tokens=5, temperature=0.0).completions() == want
    assert generate(lm, tok, prompts, max_new_tokens=5) == want


def test_generator_makes_sampling_repeatable(tiny):
    lm, tok = tiny
    prompts = _prompts(tok, 3)
    seed = random.randrange(10**6)
    runs = [sample(lm, tok, prompts, max_new_tokens=6, num_samples=3, generator=torch.Generator().manual_seed(seed))
            for _ in range(2)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)


def test_hf_sampler_and_backend_choice(tiny):
    lm, tok = tiny
    sampler = make_sampler("hf", lm, tok)
    assert isinstance(sampler, HFSampler)
    assert isinstance(make_sampler("auto", lm, tok), HFSampler)  # no GPU here: never vLLM
    out = sampler.sample(_prompts(tok, 2), max_new_tokens=3, num_samples=2)
    assert out.completion_ids.shape[0] == 4
    with pytest.raises(ValueError, match="generation backend must be 'auto', 'hf' or 'vllm', got 'tgi'"):
        make_sampler("tgi", lm, tok)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'vllm' needs vllm installed and a CUDA GPU"):
            make_sampler("vllm", lm, tok, model_path="x")


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\], got 0.0"),
    (dict(top_k=-2), "top_k must be an int >= 0"),
    (dict(num_samples=0), "num_samples must be an int >= 1, got 0"),
])
def test_bad_sampling_arguments_are_named(tiny, kwargs, message):
    lm, tok = tiny
    args = dict(max_new_tokens=4, **{k: v for k, v in kwargs.items() if k != "max_new_tokens"})
    if "max_new_tokens" in kwargs:
        args["max_new_tokens"] = kwargs["max_new_tokens"]
    with pytest.raises(ValueError, match=message):
        sample(lm, tok, _prompts(tok, 1), **args)


def test_bad_prompts_are_named(tiny):
    lm, tok = tiny
    with pytest.raises(ValueError, match="prompt_ids must be a non-empty list"):
        sample(lm, tok, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_ids\\[1\\] must be a non-empty list of ints"):
        sample(lm, tok, [[1, 5], []], max_new_tokens=2)


FSDP_WORKER = textwrap.dedent('''
    import sys
    import torch
    from fastalign.data import loading
    from fastalign.engine.distributed import init_distributed, shutdown, wrap_model
    from fastalign.engine.generation import gathered_for_generation, sample
    from fastalign.models.heads import CausalLMLogprobs
    from fastalign.models.loading import load_causal_lm, load_tokenizer

    out, seed = sys.argv[1], int(sys.argv[2])
    state = init_distributed()
    torch.set_num_threads(1)
    tok = load_tokenizer("tiny")
    lm = load_causal_lm("tiny")
    with torch.no_grad():  # weights that differ from the cached tiny model, the same on every process
        g = torch.Generator().manual_seed(seed)
        for p in lm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    prompts = [loading.encode_prompt(tok, t) for t in ("12+34=", "7+8=", "The pilot lost ___ keys. ___=")]
    model = wrap_model(CausalLMLogprobs(lm), state, fsdp=state.distributed)
    with gathered_for_generation(model):
        rollout = sample(lm, tok, prompts, max_new_tokens=6, temperature=1.0, num_samples=2,
                         generator=torch.Generator().manual_seed(seed))
    sharded = [type(p).__name__ for p in lm.parameters()]
    if state.is_main:
        torch.save({"ids": rollout.completion_ids, "logprobs": rollout.logprobs, "sharded": sharded}, out)
    shutdown(state)
''')


def test_fsdp2_generation_gathers_parameters_and_matches_one_process(tmp_path):
    # The same script in this process (world size 1: no sharding) is the reference.
    one, two = one_and_two_processes(FSDP_WORKER, tmp_path, random.randrange(10**6))
    assert "DTensor" in two["sharded"]  # after generation the parameters are sharded again
    assert torch.equal(one["ids"], two["ids"])
    assert rel_err(two["logprobs"], one["logprobs"]) < 1e-5
