"""A plain PyTorch GRPO-style loop on any transformers causal LM, with fastalign's fused LM head.

``fused_lm_head(model)`` makes ``model(ids, labels=labels)`` return per-token log-probs and entropy
without building the ``[B, T, V]`` logits; generation is untouched. The rest is ~30 lines of ordinary
PyTorch: sample G completions per prompt, score them, group advantages, clipped policy loss.

    python examples/grpo_loop.py [--steps 30]

Runs on fastalign's embedded tiny model in about a minute on CPU; the reward (share of digits in the
completion) rises.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastalign import ops
from fastalign.integrations.hf import fused_lm_head
from fastalign.models.tiny import tiny_path


def digit_share(texts):
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max_new_tokens", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)

    path = str(tiny_path())
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # prompts end where the completions start
    model = fused_lm_head(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    for step in range(1, args.steps + 1):
        prompts = [f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=" for _ in range(args.prompts)]
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            seqs = model.generate(**enc, do_sample=True, max_new_tokens=args.max_new_tokens,
                                  num_return_sequences=args.generations, pad_token_id=tok.pad_token_id)
        prompt_len = enc["input_ids"].shape[1]
        completions = seqs[:, prompt_len:]
        # completion tokens up to and including the first EOS count; the prompt and what follows EOS do not
        after_eos = (completions == tok.eos_token_id).long().cumsum(1) - (completions == tok.eos_token_id).long()
        keep = after_eos == 0
        attention = torch.cat([enc["attention_mask"].repeat_interleave(args.generations, 0), keep.long()], 1)
        labels = torch.full_like(seqs, -100)
        labels[:, prompt_len:] = torch.where(keep, completions, -100)

        rewards = torch.tensor(digit_share(tok.batch_decode(torch.where(keep, completions, tok.pad_token_id),
                                                            skip_special_tokens=True)))
        advantages = ops.group_advantages(rewards, args.generations)

        out = model(seqs, attention_mask=attention, labels=labels)  # log-probs, no logits
        logp, mask = out.log_probs[:, prompt_len - 1:], out.label_mask[:, prompt_len - 1:]
        # one optimizer step per rollout: the sampling policy is this policy, so old_logp = sg(logp)
        loss, metrics = ops.policy_loss(logp, logp.detach(), advantages, mask, loss_type="dapo")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == 1:
            entropy = (out.entropy[:, prompt_len - 1:] * mask).sum() / mask.sum()
            print(f"step {step:3d}  reward {rewards.mean():.3f}  entropy {entropy:.3f}  "
                  f"clipped {metrics['clip_ratio/region_mean']:.3f}")


if __name__ == "__main__":
    main()
