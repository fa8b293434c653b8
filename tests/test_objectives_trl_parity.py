"""This year's GRPO recipes against TRL 1.16's own ``GRPOTrainer._compute_loss``: 5 optimizer steps.

Each recipe (GSPO, DAPO with the entropy mask and bonus, CISPO with the off-policy mask and the rollout
importance correction, two-sided clipping with the KL bias correction) trains two copies of the same tiny
Llama for 5 SGD steps on the same completions: one with :class:`FusedLinearGRPOLoss` (and the new ops for
the per-token weights), one with TRL's unmodified ``_compute_loss`` bound to a harness (see
``test_losses_trl_parity.py``). The losses must agree at every step within 1e-5 (fp32, one thread).
Not covered: TRL's generation loop (``GRPOTrainer.train`` samples its own completions); the two lines of
``_generate_and_score_completions`` that turn vLLM's log-probs into ``importance_sampling_ratio`` are
replicated below, marked so.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

pytest.importorskip("trl")
from test_losses_trl_parity import GRPOHarness, grpo_batch, tiny_llama  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from fastalign import ops  # noqa: E402
from fastalign.losses import FusedLinearGRPOLoss  # noqa: E402

RECIPES = {
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4,
                 beta=0.04, use_bias_correction_kl=True),
    "dapo_entropy": dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, top_entropy_quantile=0.2,
                         entropy_coef=0.01),
    "cispo_corrected": dict(loss_type="cispo", epsilon_low=0.2, epsilon_high=5.0, beta=0.04,
                            use_bias_correction_kl=True, off_policy_mask_threshold=0.01,
                            vllm_importance_sampling_mode="sequence_mask"),
    "two_sided": dict(loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.28, delta=1.5, beta=0.04,
                      use_bias_correction_kl=True),
}


class Harness(GRPOHarness):
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)

    def __init__(self, model, r, max_len):
        super().__init__(model, loss_type=r["loss_type"], beta=r.get("beta", 0.0), epsilon_low=r["epsilon_low"],
                         epsilon_high=r["epsilon_high"], max_completion_length=max_len)
        self.args.use_bias_correction_kl = r.get("use_bias_correction_kl", False)
        self.args.delta = r.get("delta")
        self.importance_sampling_level = r.get("importance_sampling_level", "token")
        self.top_entropy_quantile = r.get("top_entropy_quantile", 1.0)
        self.off_policy_mask_threshold = r.get("off_policy_mask_threshold")
        self.use_vllm = self.vllm_importance_sampling_correction = "vllm_importance_sampling_mode" in r
        self.entropy_coef = r.get("entropy_coef", 0.0)
        self.use_adaptive_entropy = False
        self._entropy_bonus_enabled = self.entropy_coef != 0.0
        self.accelerator.sync_gradients = True


def trl_importance_ratio(old, sampling, mask, mode, clip_max):
    """Replicated from GRPOTrainer._generate_and_score_completions (vLLM importance sampling, TRL 1.16)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=None, max=clip_max)
    return ratio.masked_fill((ratio < -math.inf) | (ratio > clip_max), value=0.0)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_five_grpo_steps_reproduce_trl_losses(recipe):
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    r = RECIPES[recipe]
    completions, prompt_len, completion_len, temperature, lr = 8, 5, 9, 1.0, 0.05
    max_len = completion_len
    ours_model = tiny_llama()
    trl_model = copy.deepcopy(ours_model)
    reference = copy.deepcopy(ours_model).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = grpo_batch(completions, prompt_len, completion_len)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    mask = batch["completion_mask"]
    labels = batch["completion_ids"].masked_fill(mask == 0, -100)
    span = slice(prompt_len - 1, prompt_len - 1 + completion_len)

    def logps_of(model):
        with torch.no_grad():
            h = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, span]
            return ops.token_logprobs(h, model.lm_head.weight, labels, temperature=temperature) * mask

    ref_logps = logps_of(reference)
    old_logps = (logps_of(ours_model) + 0.05 * torch.randn(completions, completion_len)) * mask
    sampling_logps = (old_logps + 0.05 * torch.randn(completions, completion_len)) * mask
    advantages = torch.randn(completions)
    num_items = int(mask.sum())
    beta = r.get("beta", 0.0)

    loss_fn = FusedLinearGRPOLoss(
        beta=beta, loss_type=r["loss_type"], epsilon_low=r["epsilon_low"], epsilon_high=r["epsilon_high"],
        max_completion_length=max_len, temperature=temperature, entropy_coef=r.get("entropy_coef", 0.0),
        importance_sampling_level=r.get("importance_sampling_level", "token"), delta=r.get("delta"),
        kl_bias_correction=r.get("use_bias_correction_kl", False),
        top_entropy_quantile=r.get("top_entropy_quantile", 1.0))
    add_fused_lm_head(trl_model, temperature=temperature, outputs=("log_probs", "entropy"))
    harness = Harness(trl_model, r, max_len)
    opt_ours = torch.optim.SGD(ours_model.parameters(), lr=lr)
    opt_trl = torch.optim.SGD(trl_model.parameters(), lr=lr)
    captured = {}

    def keep_hidden(_module, _args, output):
        captured["h"] = output.last_hidden_state

    hook = ours_model.model.register_forward_hook(keep_hidden)
    ours_losses, trl_losses = [], []
    for _ in range(5):
        # Ours: the per-token weights from the ops, the loss from the fused head.
        weights = None
        if "vllm_importance_sampling_mode" in r:
            weights = ops.rollout_is_weights(old_logps, sampling_logps, mask, mode=r["vllm_importance_sampling_mode"],
                                             high=3.0)
        if r.get("off_policy_mask_threshold") is not None:
            keep = ops.off_policy_mask(logps_of(ours_model), sampling_logps, advantages, mask,
                                       threshold=r["off_policy_mask_threshold"]).expand_as(old_logps)
            weights = keep if weights is None else weights * keep
        ours_model(input_ids=input_ids, attention_mask=attention_mask)
        loss, _ = loss_fn(captured["h"][:, span], ours_model.lm_head.weight, labels, advantages=advantages,
                          mask=mask, old_logps=old_logps, ref_logps=ref_logps if beta else None,
                          num_items=num_items if r["loss_type"] in ("dapo", "cispo") else None, token_weights=weights)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()
        ours_losses.append(loss.item())

        # TRL's _compute_loss, unmodified.
        inputs = dict(batch, advantages=advantages, old_per_token_logps=old_logps, ref_per_token_logps=ref_logps,
                      num_items_in_batch=torch.tensor(float(num_items)), sampling_per_token_logps=sampling_logps)
        if "vllm_importance_sampling_mode" in r:
            inputs["importance_sampling_ratio"] = trl_importance_ratio(old_logps, sampling_logps, mask,
                                                                       r["vllm_importance_sampling_mode"], 3.0)
        trl_loss = harness._compute_loss(trl_model, inputs)
        opt_trl.zero_grad()
        trl_loss.backward()
        opt_trl.step()
        trl_losses.append(trl_loss.item())
    hook.remove()
    for step, (a, b) in enumerate(zip(ours_losses, trl_losses)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (recipe, step, ours_losses, trl_losses)
    assert len(set(round(x, 7) for x in trl_losses)) > 1  # the steps did change the policy
