"""Fused-linear D²O, KTO, ORPO and CPO: against float64 formulas on materialized logits, against
DPO (D²O with K = 1, α = β), against TRL's KTOTrainer and Liger's ORPO/CPO losses (CPU)."""

from __future__ import annotations

import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fastalign.losses import (
    FusedLinearCPOLoss,
    FusedLinearD2OLoss,
    FusedLinearDPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
)


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm().clamp(min=1e-12)).item()


def inputs(rows, t, h, vocab, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, t, h, generator=g) * 0.7).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, h, generator=g) * 2 / h ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows, t), generator=g)
    rnd = random.Random(seed)
    for r in range(rows):
        start = rnd.randint(0, t // 2)
        end = rnd.randint(start + 1, t)
        labels[r, :start] = -100
        labels[r, end:] = -100
    return hidden, weight, labels


def seq_logps64(hidden, weight, labels):
    """Summed and averaged token log-probs per sequence, float64 on the full logits."""
    logits = hidden.double() @ weight.double().t()
    valid = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid
    return lp.sum(-1), lp.sum(-1) / valid.sum(-1).clamp(min=1), lp, valid


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


# ---------------------------------------------------------------------------------------------- D²O
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("budget", [None, "tight"])
def test_d2o_matches_float64_formula(dtype, tol, budget):
    torch.manual_seed(1)
    b, k, t, h, vocab = 3, 4, 9, 16, 53
    hidden, weight, labels = inputs(b * (k + 1), t, h, vocab, dtype)
    ref_hidden = (hidden.detach() + 0.1 * torch.randn_like(hidden.detach().float()).to(dtype))
    beta, alpha = 0.3, 0.2
    chunk = 7 if budget else None  # token-chunked groups (a group is up to 45 tokens)
    loss, metrics = FusedLinearD2OLoss(num_samples=k, beta=beta, alpha=alpha, chunk_size=chunk)(
        hidden, weight, labels, ref_hidden=ref_hidden)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    pol, _, _, _ = seq_logps64(h64, w64, labels)
    with torch.no_grad():
        ref, _, _, _ = seq_logps64(ref_hidden.double(), weight.double(), labels)
    pol, ref = pol.reshape(b, k + 1), ref.reshape(b, k + 1)
    s = pol - ref
    z = beta * s[:, :k].mean(1) - alpha * s[:, k]
    want = -torch.nn.functional.logsigmoid(z).mean()
    assert rel_err(loss, want) < tol
    for got, exp in zip(grads(loss, (hidden, weight)), grads(want, (h64, w64))):
        assert rel_err(got, exp) < tol
    assert rel_err(metrics["rewards/accuracies"], (z > 0).double().mean()) < 1e-6 or dtype == torch.bfloat16
    assert rel_err(metrics["rewards/samples"], (beta * s[:, :k].mean(1)).mean()) < tol


def test_d2o_with_one_sample_is_dpo():
    torch.manual_seed(2)
    b, t, h, vocab = 4, 10, 12, 41
    hidden, weight, labels = inputs(2 * b, t, h, vocab, seed=3)
    ref_hidden = hidden.detach() + 0.2 * torch.randn_like(hidden.detach())
    # D²O layout: (sample_i, negative_i) per prompt; DPO layout: all chosen, then all rejected.
    order = torch.stack([torch.arange(b), torch.arange(b) + b], 1).reshape(-1)
    d2o_h = hidden[order]
    loss, metrics = FusedLinearD2OLoss(num_samples=1, beta=0.1, alpha=0.1)(
        d2o_h, weight, labels[order], ref_hidden=ref_hidden[order])
    dpo, dpo_metrics = FusedLinearDPOLoss(beta=0.1)(hidden, weight, labels, ref_hidden=ref_hidden)
    assert rel_err(loss, dpo) < 1e-6
    for got, want in zip(grads(loss, (hidden, weight)), grads(dpo, (hidden, weight))):
        assert rel_err(got, want) < 1e-6
    assert rel_err(metrics["rewards/samples"], dpo_metrics["rewards/chosen"]) < 1e-6
    assert metrics["rewards/accuracies"].item() == dpo_metrics["rewards/accuracies"].item()


def test_d2o_bad_layout_names_it():
    hidden, weight, labels = inputs(7, 5, 8, 11)
    with pytest.raises(ValueError, match=r"hidden must hold B·3 sequences \(for each prompt its K samples"):
        FusedLinearD2OLoss(num_samples=2)(hidden, weight, labels, ref_logps=torch.zeros(7))
    with pytest.raises(ValueError, match="D²O needs the reference model"):
        FusedLinearD2OLoss(num_samples=6)(hidden, weight, labels)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        FusedLinearD2OLoss(num_samples=0)


# ---------------------------------------------------------------------------------------------- KTO
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kto_matches_float64_formula_with_kl_from_mismatched_rows(dtype, tol):
    torch.manual_seed(3)
    b, t, h, vocab = 5, 8, 16, 37
    hidden, weight, labels = inputs(2 * b, t, h, vocab, dtype, seed=5)
    ref_hidden = hidden.detach() + 0.3 * torch.randn_like(hidden.detach().float()).to(dtype)
    desirable = torch.tensor([True, False, True, True, False])
    beta, wd, wu = 0.5, 1.2, 0.7
    loss, metrics = FusedLinearKTOLoss(beta=beta, desirable_weight=wd, undesirable_weight=wu, chunk_size=5)(
        hidden, weight, labels, desirable, ref_hidden=ref_hidden)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    pol, _, _, _ = seq_logps64(h64, w64, labels)
    with torch.no_grad():
        ref, _, _, _ = seq_logps64(ref_hidden.double(), weight.double(), labels)
    z0 = (pol[b:] - ref[b:]).detach().mean().clamp(min=0)
    r = pol[:b] - ref[:b]
    per = torch.where(desirable, wd * (1 - torch.sigmoid(beta * (r - z0))), wu * (1 - torch.sigmoid(beta * (z0 - r))))
    want = per.mean()
    assert rel_err(loss, want) < tol
    for got, exp in zip(grads(loss, (hidden, weight)), grads(want, (h64, w64))):
        assert rel_err(got, exp) < tol
    assert abs(metrics["kl"].item() - z0.item()) < 1e-4 + tol * abs(z0.item())


def test_kto_given_reference_point_and_errors():
    b, t, h, vocab = 3, 6, 8, 19
    hidden, weight, labels = inputs(b, t, h, vocab, seed=6)
    desirable = torch.tensor([True, False, False])
    ref_logps = torch.randn(b) - 5
    loss, metrics = FusedLinearKTOLoss()(hidden, weight, labels, desirable, ref_logps=ref_logps, kl_ref=0.3)
    assert metrics["kl"].item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="hidden must hold B·2 sequences"):
        FusedLinearKTOLoss()(hidden, weight, labels, desirable, ref_logps=ref_logps)
    with pytest.raises(TypeError, match="desirable must have dtype in \\(bool\\)"):
        FusedLinearKTOLoss()(hidden, weight, labels, desirable.float(), ref_logps=ref_logps, kl_ref=0.0)
    with pytest.raises(ValueError, match="KTO needs the reference model"):
        FusedLinearKTOLoss()(hidden, weight, labels, desirable, kl_ref=0.0)


# ---------------------------------------------------------------------------------- Liger ORPO, CPO
def test_orpo_matches_liger():
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
    torch.manual_seed(4)
    pairs, t, h, vocab = 3, 11, 20, 67
    hidden, weight, labels = inputs(2 * pairs, t, h, vocab, seed=7)
    bias = (torch.randn(vocab) * 0.1).requires_grad_()
    liger_loss, aux = chunked_loss.LigerFusedLinearORPOLoss(beta=0.2, compiled=False)(weight, hidden, labels, bias)
    loss, metrics = FusedLinearORPOLoss(beta=0.2)(hidden, weight, labels, bias=bias)
    assert rel_err(loss, liger_loss) < 1e-5
    for got, want in zip(grads(loss, (hidden, weight, bias)), grads(liger_loss, (hidden, weight, bias))):
        assert rel_err(got, want) < 1e-5
    # Liger's aux: chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll, then ORPO's own.
    chosen_logps, rejected_logps, _, _, nll, chosen_r, rejected_r, log_odds_ratio, log_odds_chosen = aux
    assert rel_err(metrics["logps/chosen"], chosen_logps.mean()) < 1e-5
    assert rel_err(metrics["nll_loss"], nll) < 1e-5
    assert rel_err(metrics["log_odds_ratio"], log_odds_ratio) < 1e-5
    assert rel_err(metrics["log_odds_chosen"], log_odds_chosen) < 1e-5
    assert rel_err(metrics["rewards/chosen"], chosen_r.mean()) < 1e-5


@pytest.mark.parametrize("alpha,smoothing", [(1.0, 0.0), (0.5, 0.2)])
def test_cpo_matches_liger(alpha, smoothing):
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
    torch.manual_seed(5)
    pairs, t, h, vocab = 3, 12, 20, 71
    hidden, weight, labels = inputs(2 * pairs, t, h, vocab, seed=8)
    bias = (torch.randn(vocab) * 0.1).requires_grad_()
    liger = chunked_loss.LigerFusedLinearCPOLoss(beta=0.1, alpha=alpha, label_smoothing=smoothing, compiled=False)
    liger_loss, aux = liger(weight, hidden, labels, bias)
    loss, metrics = FusedLinearCPOLoss(beta=0.1, alpha=alpha, label_smoothing=smoothing)(hidden, weight, labels,
                                                                                          bias=bias)
    assert rel_err(loss, liger_loss) < 1e-5
    for got, want in zip(grads(loss, (hidden, weight, bias)), grads(liger_loss, (hidden, weight, bias))):
        assert rel_err(got, want) < 1e-5
    assert rel_err(metrics["rewards/chosen"], aux[-2].mean()) < 1e-5


def test_orpo_cpo_refuse_a_reference():
    hidden, weight, labels = inputs(4, 5, 8, 11)
    with pytest.raises(ValueError, match="ref_hidden must be None: ORPO uses no reference model"):
        FusedLinearORPOLoss()(hidden, weight, labels, ref_hidden=hidden.detach())
    with pytest.raises(ValueError, match="ref_logps must be None: CPO uses no reference model"):
        FusedLinearCPOLoss()(hidden, weight, labels, ref_logps=torch.zeros(4))


# ------------------------------------------------------------------------------------ TRL KTOTrainer
@pytest.mark.parametrize("seed", [0, 5])  # z0 clamped to 0 with seed 0, live (0.14) with 5
def test_kto_matches_trl_kto_trainer(seed):
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(seed)
    random.seed(seed)
    vocab = 61
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    policy = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        policy.lm_head.weight.mul_(8.0)
    reference = transformers.LlamaForCausalLM(cfg).float()
    reference.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.train()
    reference.eval()

    # Unpaired rows (prompt, completion, label) and TRL's mismatched KL rows (completion i-1 after prompt i).
    b, length = 5, 14
    prompts = [torch.randint(1, vocab, (random.randint(2, 5),)) for _ in range(b)]
    completions = [torch.randint(1, vocab, (random.randint(1, 6),)) for _ in range(b)]
    shifted = [completions[-1]] + completions[:-1]
    labels_b = torch.tensor([True, False, True, False, False])

    def rows(comps):
        ids = torch.zeros(b, length, dtype=torch.long)
        attn, cmask = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            n = len(p) + len(c)
            ids[i, :n] = torch.cat([p, c])
            attn[i, :n] = 1
            cmask[i, len(p):n] = 1
        return ids, attn, cmask

    ids, attn, cmask = rows(completions)
    kl_ids, kl_attn, kl_cmask = rows(shifted)
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask, "KL_input_ids": kl_ids,
             "KL_attention_mask": kl_attn, "KL_completion_mask": kl_cmask, "label": labels_b}

    all_ids, all_attn = torch.cat([ids, kl_ids]), torch.cat([attn, kl_attn])
    labels = all_ids.masked_fill(torch.cat([cmask, kl_cmask]) == 0, -100)[:, 1:]
    hidden = policy.model(input_ids=all_ids, attention_mask=all_attn).last_hidden_state
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=all_ids, attention_mask=all_attn).last_hidden_state
    beta, wd, wu = 0.2, 1.0, 1.5
    loss, metrics = FusedLinearKTOLoss(beta=beta, desirable_weight=wd, undesirable_weight=wu)(
        hidden[:, :-1], policy.lm_head.weight, labels, labels_b, ref_hidden=ref_hidden[:, :-1],
        ref_weight=reference.lm_head.weight)
    loss.backward()
    ours = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()

    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits"))
    add_fused_lm_head(reference)
    harness = SimpleNamespace(
        model=policy, ref_model=reference, accelerator=accelerate.Accelerator(cpu=True),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), aux_loss_enabled=False, calculate_KL=True,
        precompute_ref_logps=False, loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    harness._compute_kl_logps = KTOTrainer._compute_kl_logps.__get__(harness)
    trl_loss = KTOTrainer._compute_loss(harness, policy, batch, return_outputs=False)
    trl_loss.backward()
    theirs = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}

    assert (metrics["kl"].item() > 1e-3) == (seed == 5)  # both branches of the clamp at 0
    assert rel_err(loss, trl_loss) < 1e-5
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) < 1e-5, name
    logged = harness._metrics["train"]
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins",
                "entropy"):
        assert abs(metrics[key].item() - logged[key][-1]) <= 1e-4 * max(1.0, abs(logged[key][-1])), key
