"""Token-budget micro-batches (engine/batching.py) and the padding-free packed training forward (models/packed.py):
the split and the packing change how the forward runs, never the loss or the gradient."""

import random

import pytest
import torch

from fastalign import ops
from fastalign.data import loading
from fastalign.engine.batching import equalize_count, forward_tokens, token_budget_microbatches
from fastalign.engine.config import GRPOConfig, KTOConfig, PPOConfig, SFTConfig, load_config
from fastalign.engine.distributed import DistState
from fastalign.engine.logging import read_metrics
from fastalign.engine.trainer import BatchStream, accumulate_gradients
from fastalign.flows import grpo, ppo
from fastalign.losses import FusedLinearGRPOLoss, FusedLinearPPOLoss
from fastalign.models.heads import IGNORE_INDEX, CausalLMLogprobs, PolicyValueModel, target_mask
from fastalign.models.loading import load_causal_lm, load_tokenizer
from fastalign.models.packed import forwarded_positions, packed_layout, padding_removed


# ------------------------------------------------------------------------------------------ the split
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_budget_split_holds_every_row_once_within_the_budget(packed):
    rng = random.Random(0)
    units = [[rng.randrange(1, 60)] if rng.random() < 0.5 else [rng.randrange(1, 60), rng.randrange(1, 60)]
             for _ in range(40)]
    budget = 150
    micro = token_budget_microbatches(units, budget, packed=packed)
    assert sorted(i for m in micro for i in m) == list(range(40))
    for m in micro:
        assert forward_tokens([n for i in m for n in units[i]], packed=packed) <= budget
    # Deterministic: the same rows give the same micro-batches.
    assert micro == token_budget_microbatches(units, budget, packed=packed)


def test_budget_split_balances_attention_cost():
    """Two long rows and many short ones, room for two micro-batches: the long rows go to different ones."""
    units = [[40], [40]] + [[5]] * 8
    micro = token_budget_microbatches(units, 80, packed=True)
    assert len(micro) == 2
    loads = [sum(units[i][0] ** 2 for i in m) for m in micro]
    assert loads[0] == loads[1]


def test_budget_smaller_than_a_row_names_the_row():
    with pytest.raises(ValueError, match=r"row 1 forwards 30 tokens .*at least 30"):
        token_budget_microbatches([[3], [30], [4]], 20, packed=True)
    with pytest.raises(ValueError, match=r"row 0 forwards 20 tokens \(sequence lengths \[4, 10\]\)"):
        token_budget_microbatches([[4, 10]], 19, packed=False)  # a pair pads to its longer side


def test_equalize_count_splits_the_fullest():
    assert equalize_count([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="cannot make 4 micro-batches out of 3 rows"):
        equalize_count([[0, 1, 2]], 4)


@pytest.mark.parametrize("bad, words", [
    (dict(max_tokens_per_microbatch=64, micro_batch_size=2), ["'micro_batch_size'", "set one"]),
    (dict(max_tokens_per_microbatch=-1), ["'max_tokens_per_microbatch'", ">= 0"]),
])
def test_budget_config_errors(bad, words):
    with pytest.raises(ValueError) as e:
        load_config(SFTConfig, overrides=bad)
    assert all(w in str(e.value) for w in words)


@pytest.mark.parametrize("cls, over, words", [
    (KTOConfig, {}, "does not apply to kto"),
    (GRPOConfig, dict(loss_type="bnpo"), "loss_type bnpo"),
    (GRPOConfig, dict(loss_type="grpo", entropy_coef=0.1), "entropy_coef > 0"),
])
def test_budget_refused_where_the_split_changes_the_loss(cls, over, words):
    with pytest.raises(ValueError, match=words):
        load_config(cls, overrides=dict(over, max_tokens_per_microbatch=64))


# --------------------------------------------------------------------- budget = fixed-size micro-batches
def _grads(model):
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_same(a, b, tol):
    la, ga = a
    lb, gb = b
    assert abs(la - lb) <= tol * max(abs(lb), 1.0)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert float((ga[k] - gb[k]).abs().max()) <= tol * max(float(gb[k].abs().max()), 1e-3), k


def test_sft_budget_equals_fixed_micro_batches():
    torch.set_num_threads(1)
    tok, lm = load_tokenizer("tiny"), load_causal_lm("tiny")
    model = CausalLMLogprobs(lm)
    examples = [loading.encode_sft(tok, r, 48) for r in loading.load_rows("arith+pronoun", "sft", n=8, seed=1)]
    collate = lambda ex, idx: loading.collate(ex, tok.pad_token_id)  # noqa: E731

    def loss_fn(m, b):
        return -m(b.input_ids, b.attention_mask, b.labels).sum(), {}

    results = {}
    for name, kw in {"fixed": dict(micro_batch_size=4), "budget": dict(max_tokens_per_microbatch=60)}.items():
        stream = BatchStream(examples, collate, batch_size=16, state=DistState(), seed=3, **kw)
        micro = stream.next()
        metrics, _ = accumulate_gradients(model, micro, loss_fn, lambda b: b.num_target_tokens(), DistState())
        results[name] = (metrics["loss"], _grads(model))
        if name == "budget":
            assert len(micro) > 4  # the budget, not the row count, decided the split
            assert all(b.input_ids.numel() <= 60 for b in micro)
    _assert_same(results["budget"], results["fixed"], 1e-6)


# --------------------------------------------------------------------------------- the packed layout
def test_packed_layout_positions_restart_per_row():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    # sdpa/eager: rows as long as the longest (4), first-fit longest first; an unfilled tail is its own sequence.
    source, pos = packed_layout(mask, "sdpa")
    assert source.tolist() == [[8, 9, 10, 11], [0, 1, 2, 4], [12, 13, -1, -1]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert forwarded_positions(mask, "sdpa") == 12
    assert padding_removed(mask, "sdpa") == pytest.approx(1 - 12 / 16)
    # flash_attention_2 (varlen): every token in one row.
    source, pos = packed_layout(mask, "flash_attention_2")
    assert source.tolist() == [[8, 9, 10, 11, 0, 1, 2, 12, 13, 4]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0]]
    assert padding_removed(mask, "flash_attention_2") == pytest.approx(1 - 10 / 16)


def _rows(n, vocab, rng, *, min_prompt=2, max_len=14):
    """Right-padded rows: a prompt (not scored) then a completion of random length."""
    examples = []
    for _ in range(n):
        p = [1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(min_prompt - 1, 5))]
        c = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, max_len - len(p)))]
        examples.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c})
    return loading.collate(examples, 0)


# The tiny model under both CPU attention paths: sdpa and eager get the block-diagonal mask from the position ids.
@pytest.fixture(params=["sdpa", "eager"])
def tiny_lm(request):
    torch.set_num_threads(1)
    lm = load_causal_lm("tiny")
    lm.config._attn_implementation = request.param
    return lm


def test_sft_packed_equals_padded(tiny_lm):
    batch = _rows(6, 100, random.Random(1))
    out = {}
    for packed in (False, True):
        logp = CausalLMLogprobs(tiny_lm, packed=packed)(batch.input_ids, batch.attention_mask, batch.labels)
        loss = -logp.sum() / batch.num_target_tokens()
        loss.backward()
        out[packed] = (float(loss.detach()), _grads(tiny_lm))
    _assert_same(out[True], out[False], 1e-5)


def test_dpo_packed_equals_padded(tiny_lm):
    batch = _rows(6, 100, random.Random(2))  # rows 0-2 chosen, 3-5 rejected
    ref = torch.randn(6, generator=torch.Generator().manual_seed(0)) - 20
    out = {}
    for packed in (False, True):
        logp = ops.sequence_logprobs(CausalLMLogprobs(tiny_lm, packed=packed)(batch.input_ids, batch.attention_mask,
                                                                              batch.labels), target_mask(batch.labels))
        losses, _, _ = ops.dpo_loss(logp[:3], logp[3:], ref[:3], ref[3:], beta=0.1)
        losses.mean().backward()
        out[packed] = (float(losses.mean()), _grads(tiny_lm))
    _assert_same(out[True], out[False], 1e-5)


def _grpo_batch(n, rng):
    b = _rows(n, 100, rng)
    mask = b.labels[:, 1:] != IGNORE_INDEX
    g = torch.Generator().manual_seed(rng.randrange(1000))
    old = torch.where(mask, -3 + 0.5 * torch.randn(mask.shape, generator=g), torch.zeros(()))
    return grpo.GRPOBatch(b.input_ids, b.attention_mask, b.labels, torch.randn(n, generator=g), old_logps=old,
                          ref_logps=torch.where(mask, old - 0.1, torch.zeros(())))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_packed_and_budget_equal_padded(tiny_lm, loss_type):
    """The padded full-row forward in one micro-batch vs the packed forward in token-budget micro-batches."""
    batch = _grpo_batch(8, random.Random(3))
    module = FusedLinearGRPOLoss(beta=0.05, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                                 max_completion_length=14)
    out = {}
    for packed in (False, True):
        cfg = load_config(GRPOConfig, overrides=dict(loss_type=loss_type, packed=packed, share_prompt_forward=False,
                                                     max_tokens_per_microbatch=40 if packed else 0))
        loss_fn, weight_fn = grpo.grpo_loss_fn(module, cfg)
        stream = grpo.RolloutStream(None, None, num_iterations=1, micro_batch_size=0, generator=torch.Generator(),
                                    max_tokens_per_microbatch=cfg.max_tokens_per_microbatch, packed=packed)
        stream.pending, stream.uses_left = batch, 1
        micro = stream.next()
        metrics, _ = accumulate_gradients(PolicyValueModel(tiny_lm, packed=packed), micro, loss_fn, weight_fn,
                                          DistState(), packed_attention="sdpa" if packed else None)
        out[packed] = (metrics["loss"], _grads(tiny_lm))
        if packed:
            assert len(micro) > 1 and 0 < metrics["padding_removed"] < 1
    _assert_same(out[True], out[False], 1e-5)


def _scored_rollout(n, rng):
    b = _rows(n, 100, rng)
    mask = target_mask(b.labels)
    g = torch.Generator().manual_seed(rng.randrange(1000))
    masked = lambda t: torch.where(mask, t, torch.zeros(()))  # noqa: E731
    return ppo.ScoredRollout(b, mask, masked(-3 + 0.3 * torch.randn(mask.shape, generator=g)), masked(torch.zeros(
        mask.shape)), masked(0.1 * torch.randn(mask.shape, generator=g)), torch.randn(n, generator=g), [None] * n,
        [""] * n, [{}] * n), masked(torch.randn(mask.shape, generator=g)), masked(torch.randn(mask.shape, generator=g))


def test_ppo_packed_and_budget_equal_padded(tiny_lm):
    """A minibatch in one padded forward vs packed token-budget micro-batches (policy with a value head)."""
    rollout, advantages, returns = _scored_rollout(8, random.Random(4))
    torch.manual_seed(0)
    policy = PolicyValueModel(tiny_lm, value_head=True)
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)  # non-zero values: the value loss has a gradient
    idx = torch.tensor([5, 0, 3, 7, 1, 6])
    out = {}
    for packed in (False, True):
        cfg = load_config(PPOConfig, overrides=dict(reward_model="unused", packed=packed,
                                                    max_tokens_per_microbatch=30 if packed else 0))
        policy.packed = packed
        loss, metrics, forwards = ppo.minibatch_backward(policy, None, FusedLinearPPOLoss(epsilon_low=0.2), rollout,
                                                         idx, advantages, returns, cfg, DistState())
        out[packed] = (loss, _grads(policy), metrics)
        assert forwards > 1 if packed else forwards == 1
        assert metrics["value_loss"] > 0
    _assert_same(out[True][:2], out[False][:2], 1e-5)
    for k, v in out[False][2].items():  # token means re-weighted, extremes taken over the micro-batches
        assert v == pytest.approx(out[True][2][k], rel=1e-5, abs=1e-6), k


# ------------------------------------------------------------------------------------------ end to end
def test_sft_run_packed_with_budget_equals_padded(tmp_path):
    """Two seeded SFT steps: padded fixed micro-batches vs packed token-budget ones give the same losses; the
    packed run logs its forwards per step and the padding it removed."""
    from fastalign.flows import sft

    base = dict(max_steps=2, batch_size=8, num_examples=16, num_eval_examples=2, progress=False, threads=1,
                warmup_steps=1, max_length=48, log_every=1, output_dir=str(tmp_path), dataset="arith+pronoun")
    sft.run(load_config(SFTConfig, overrides=dict(base, name="padded", micro_batch_size=4)))
    sft.run(load_config(SFTConfig, overrides=dict(base, name="packed", packed=True, max_tokens_per_microbatch=100)))
    padded, packed = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("padded", "packed"))
    for a, b in zip(padded, packed):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
        assert a["forwards"] == 2 and b["forwards"] >= 2
        assert 0 < b["padding_removed"] < 1 and "padding_removed" not in a


def test_grpo_run_packed_with_budget_equals_padded(tmp_path):
    """The first seeded step of a GRPO run (its rollout is sampled before any update): padded in one forward vs
    packed token-budget micro-batches give the same loss and entropy; the packed run logs its forwards and the
    padding it removed."""
    base = dict(max_steps=1, num_examples=16, num_eval_examples=2, progress=False, threads=1, warmup_steps=0,
                max_length=48, output_dir=str(tmp_path), batch_size=2, num_generations=4, loss_type="dapo",
                share_prompt_forward=False)
    grpo.run(load_config(GRPOConfig, overrides=dict(base, name="padded")))
    grpo.run(load_config(GRPOConfig, overrides=dict(base, name="packed", packed=True, max_tokens_per_microbatch=40)))
    (padded,), (packed,) = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("padded", "packed"))
    for key in ("loss", "entropy"):
        assert abs(padded[key] - packed[key]) <= 1e-5 * abs(padded[key]) + 1e-7, key
    assert padded["forwards"] == 1 and packed["forwards"] > 1
    # Near-equal rollout rows leave nothing to pack into rows as long as the longest (sdpa): 0 is the honest value.
    assert 0 <= packed["padding_removed"] < 1 and "padding_removed" not in padded
