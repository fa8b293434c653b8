"""fastalign.integrations.hf.fused_lm_head on a real tiny Llama: per-token log-probs and entropy
against float64 log_softmax of the model's own logits, values and gradients."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastalign.integrations.hf import fused_lm_head, unfuse_lm_head  # noqa: E402

VOCAB = 41


def tiny():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # spread, so the entropy is not at its maximum
    return model


def truth(model, ids, labels, temperature, softcap=None):
    """float64 log p(label) and entropy from the model's own logits, and the gradient of their sum."""
    model.zero_grad()
    logits = model(ids).logits[:, :-1].double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp_all = torch.log_softmax(logits / temperature, -1)
    y = labels[:, 1:]
    valid = y != -100
    logp = torch.where(valid, logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    (logp.sum() + 0.5 * ent.sum()).backward()
    return logp.detach(), ent.detach(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 4.0)])
def test_fused_forward_matches_the_models_logits(temperature, softcap):
    model = tiny()
    model.config.final_logit_softcapping = softcap
    ids = torch.randint(0, VOCAB, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 7:] = -100  # padding
    want_logp, want_ent, want_grads = truth(model, ids, labels, temperature, softcap)
    fused_lm_head(model, temperature=temperature)
    model.zero_grad()
    out = model(ids, labels=labels)
    assert out.logits is None and out.log_probs.shape == (3, 8)
    assert torch.equal(out.label_mask, labels[:, 1:] != -100)
    (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
    assert torch.allclose(out.log_probs.double(), want_logp, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.entropy.double(), want_ent, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad.double(), want_grads[name], rtol=1e-4, atol=1e-5), name
    nll = -(want_logp.sum() / (labels[:, 1:] != -100).sum())
    assert abs(out.loss.item() - nll.item()) < 1e-5


def test_without_labels_generation_is_unchanged_and_unfuse_restores():
    model = tiny().eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    fused_lm_head(model)
    fused_lm_head(model, temperature=0.5)  # again: replaces the options, keeps the original forward
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)
    assert model(ids).logits.shape == (2, 5, VOCAB)
    unfuse_lm_head(model)
    assert "forward" not in model.__dict__
    assert model(ids, labels=ids).logits is not None


def test_config_transform_it_cannot_apply_raises_naming_it():
    model = tiny()
    model.config.logits_scaling = 4.0
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        fused_lm_head(model)
    with pytest.raises(ValueError, match="temperature"):
        fused_lm_head(tiny(), temperature=0.0)
