"""torchrun with 2 gloo processes gives the loss and gradients of one process over the same global batch."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_two_processes

WORKER = textwrap.dedent('''
    import sys
    import torch
    from fastalign import ops
    from fastalign.data import loading
    from fastalign.engine.distributed import init_distributed, shutdown, unwrap, wrap_model
    from fastalign.engine.trainer import BatchStream, accumulate_gradients
    from fastalign.models.heads import CausalLMLogprobs, target_mask
    from fastalign.models.loading import load_causal_lm, load_tokenizer
    from fastalign.models.reference import FrozenCopy

    out, seed, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state = init_distributed()
    torch.set_num_threads(1)
    tok = load_tokenizer("tiny")
    policy = CausalLMLogprobs(load_causal_lm("tiny"))
    reference = FrozenCopy(policy)
    with torch.no_grad():  # a policy that differs from its reference, the same on every process
        g = torch.Generator().manual_seed(seed)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model = wrap_model(policy, state)

    def sft_loss(m, b):
        return -m(b.input_ids, b.attention_mask, b.labels).sum(), {}

    def dpo_loss(m, b):
        n = b.input_ids.shape[0] // 2
        logp = ops.sequence_logprobs(m(b.input_ids, b.attention_mask, b.labels), target_mask(b.labels))
        ref = ops.sequence_logprobs(reference.token_logps(b), target_mask(b.labels))
        losses, cr, rr = ops.dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], beta=0.5)
        return losses.sum(), {"reward_acc": (cr > rr).float().sum()}

    results = {}
    sft_rows = loading.load_rows("arith+pronoun", "sft", n=8, seed=seed)
    pref_rows = loading.load_rows("pronoun+arith", "preferences", n=8, seed=seed)
    for name, rows, encode, collate, loss_fn, weight in [
        ("sft", sft_rows, loading.encode_sft, lambda e, i: loading.collate(e, 0), sft_loss,
         lambda b: b.num_target_tokens()),
        ("dpo", pref_rows, loading.encode_preference, lambda e, i: loading.collate_preferences(e, 0), dpo_loss,
         lambda b: b.input_ids.shape[0] // 2)]:
        stream = BatchStream([encode(tok, r, 64) for r in rows], collate, batch_size=8, micro_batch_size=micro,
                             state=state, seed=seed)
        metrics, _ = accumulate_gradients(model, stream.next(), loss_fn, weight, state)
        results[name] = (metrics, {k: p.grad.clone() for k, p in unwrap(model).named_parameters()})
        unwrap(model).zero_grad(set_to_none=True)
    # FSDP2 (fully_shard per decoder layer + root) on the SFT loss: gathered gradients must match too.
    fsdp_policy = CausalLMLogprobs(load_causal_lm("tiny"))
    fsdp_policy.load_state_dict(unwrap(model).state_dict())
    sharded = wrap_model(fsdp_policy, state, fsdp=True)
    stream = BatchStream([loading.encode_sft(tok, r, 64) for r in sft_rows], lambda e, i: loading.collate(e, 0),
                         batch_size=8, micro_batch_size=micro, state=state, seed=seed)
    metrics, _ = accumulate_gradients(sharded, stream.next(), sft_loss, lambda b: b.num_target_tokens(), state)
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for k, p in sharded.named_parameters()}
    results["fsdp"] = (metrics, grads)
    if state.is_main:
        torch.save(results, out)
    shutdown(state)
''')


def _run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_processes_match_one_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    seed = int(torch.randint(0, 10**6, ()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    _run([sys.executable, str(worker), str(tmp_path / "one.pt"), str(seed), "8"], env)
    run_two_processes(worker, tmp_path / "two.pt", seed, 2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    one["fsdp"] = one["sft"]  # one process: the same loss and gradients whatever the wrapping
    for name in ("sft", "dpo", "fsdp"):
        (m1, g1), (m2, g2) = one[name], two[name]
        assert m1.keys() == m2.keys()
        for k in m1:
            assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), (name, k)
        for k in g1:
            a, b = g1[k].double(), g2[k].double()
            assert torch.isfinite(b).all()
            assert float((a - b).norm()) <= 1e-5 * float(a.norm()) + 1e-9, (name, k)
        assert any(float(g.norm()) > 0 for g in g1.values())
