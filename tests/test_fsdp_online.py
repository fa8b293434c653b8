"""FSDP2 (``fully_shard``) for the online flows, on 2 gloo processes on CPU.

GRPO: ``torchrun --nproc_per_node 2 -m fastalign.cli grpo --fsdp true`` gives the losses and weights of one
process after 3 steps, and one process resumes from the 2-process (sharded) checkpoint to the same weights.
The rollouts are greedy (``top_k 1``) so that both world sizes sample the same completions (each process
samples with its own RNG otherwise); identical samples of a group have equal rewards, so the entropy bonus
and the KL to the sharded frozen reference carry the gradient. ``fsdp_offload`` (CPUOffloadPolicy) is on: on
CPU it runs the offload code path, not its memory saving.

PPO samples with each process's RNG and whitens advantages per process (as TRL), so its 2-process run depends
on the world size: FSDP2 is checked against DDP at world size 2, on a LoRA policy with the ``adapter``
reference and a separate (sharded, fully trained) value model.

A 2-process checkpoint keeps each process's sampling RNG, so a resume at the same world size continues every
process's stream (before, every process resumed the main process's).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fastalign.engine.config import GRPOConfig, RewardConfig, load_config

GRPO = dict(max_steps=3, batch_size=2, num_generations=2, num_examples=8, num_eval_examples=2, max_new_tokens=4,
            top_k=1, entropy_coef=0.1, beta=0.1, progress=False, threads=1, fsdp=True, fsdp_offload=True)
PPO = dict(max_steps=3, batch_size=4, mini_batch_size=2, ppo_epochs=1, num_examples=8, num_eval_examples=2,
           max_new_tokens=4, max_length=48, progress=False, threads=1, lora_r=4, reference="adapter")
TOLERANCE = 1e-6


def _torchrun_cli(flow: str, options: dict):
    """``torchrun --nproc_per_node 2 -m fastalign.cli <flow> --key value ...`` (gloo, one thread per process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    args = [a for k, v in options.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
           "fastalign.cli", flow, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run_dir) -> list:
    return [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= TOLERANCE, worst


def test_grpo_fsdp_on_two_processes_equals_one_process_and_resumes_on_one(tmp_path):
    from fastalign.flows import grpo

    two = tmp_path / "two"
    _torchrun_cli("grpo", dict(GRPO, output_dir=tmp_path, name="two", save_every=2))
    report = grpo.run(load_config(GRPOConfig, overrides=dict(GRPO, output_dir=str(tmp_path), name="one")))
    one = tmp_path / "one"
    assert report["steps"] == 3 and report["reference"] == "frozen_copy"

    # 3 steps on 2 processes (policy and reference sharded) = 3 steps on 1 process.
    assert _losses(two) == pytest.approx(_losses(one), abs=TOLERANCE)
    assert len(set(_losses(one))) == 3  # the steps trained: each loss differs
    final_one = load_file(str(one / "model" / "model.safetensors"))
    _assert_same_weights(load_file(str(two / "model" / "model.safetensors")), final_one)
    step2, step3 = (load_file(str(two / "checkpoints" / f"step-000000{s}" / "model.safetensors")) for s in (2, 3))
    assert max(float((step2[k] - step3[k]).abs().max()) for k in step2) > 100 * TOLERANCE  # step 3 moves weights

    # One process continues the 2-process run from its step-2 checkpoint (weights and Adam state resharded).
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000003")
    (resumed / "checkpoints" / "latest").write_text("step-0000002")
    grpo.run(load_config(GRPOConfig, overrides=dict(GRPO, output_dir=str(tmp_path), name="resumed", resume=True)))
    assert _losses(resumed)[-1] == pytest.approx(_losses(one)[-1], abs=TOLERANCE)
    _assert_same_weights(load_file(str(resumed / "model" / "model.safetensors")), final_one)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from fastalign.flows import reward

    root = tmp_path_factory.mktemp("fsdp_rm")
    reward.run(load_config(RewardConfig, overrides=dict(max_steps=1, batch_size=4, num_examples=8, num_eval_examples=2,
                                                        progress=False, threads=1, warmup_steps=0, max_length=48,
                                                        output_dir=str(root), name="rm")))
    return str(root / "rm" / "model")


def test_ppo_fsdp_lora_equals_ddp_on_two_processes(tmp_path, reward_model_dir):
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        _torchrun_cli("ppo", dict(PPO, reward_model=reward_model_dir, output_dir=tmp_path, name=name, fsdp=fsdp))
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert _losses(fsdp) == pytest.approx(_losses(ddp), abs=TOLERANCE)
    # The checkpoint holds what trains: the LoRA weights of the policy and the whole value model.
    a = load_file(str(ddp / "checkpoints" / "step-0000003" / "model.safetensors"))
    b = load_file(str(fsdp / "checkpoints" / "step-0000003" / "model.safetensors"))
    assert any("lora_" in k for k in a) and any(k.startswith("critic.") for k in a)
    _assert_same_weights(a, b)
    assert torch.isfinite(torch.tensor(_losses(fsdp))).all()


STATE_WORKER = textwrap.dedent('''
    import sys
    from types import SimpleNamespace

    import torch
    from fastalign.engine.distributed import init_distributed, shutdown
    from fastalign.engine.trainer import BatchStream, Trainer

    run_dir, out = sys.argv[1], sys.argv[2]
    state = init_distributed()

    def trainer(generator):
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        return Trainer(cfg=SimpleNamespace(keep_checkpoints=2), run_dir=run_dir, model=model, optimizer=optimizer,
                       scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       stream=BatchStream(list(range(8)), lambda e, i: e, batch_size=4, state=state, seed=0),
                       state=state, extra_state={"generator": generator})

    # Each process samples with its own RNG (as GRPO and PPO do); the checkpoint is written mid-stream.
    sampler = torch.Generator().manual_seed(1000 + state.rank)
    torch.rand(5, generator=sampler)
    saving = trainer(sampler)
    saving.step = 1
    saving.save()
    expected = torch.rand(5, generator=sampler)
    resumed_sampler = torch.Generator().manual_seed(7)
    trainer(resumed_sampler).resume()
    torch.save({"expected": expected, "resumed": torch.rand(5, generator=resumed_sampler)}, f"{out}-{state.rank}.pt")
    shutdown(state)
''')


def test_a_two_process_checkpoint_resumes_each_process_sampling_rng(tmp_path):
    from conftest import run_two_processes

    worker = tmp_path / "worker.py"
    worker.write_text(STATE_WORKER)
    run_two_processes(worker, tmp_path / "run", tmp_path / "draws")
    draws = [torch.load(tmp_path / f"draws-{rank}.pt") for rank in (0, 1)]
    for d in draws:
        assert torch.equal(d["resumed"], d["expected"])
    assert not torch.equal(draws[0]["expected"], draws[1]["expected"])  # the processes' streams differ
