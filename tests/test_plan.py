"""``fastalign plan``: the arithmetic on a hand-computed shape, the activation count against what autograd saves,
the command for each flow on the tiny model, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from fastalign.cli import main
from fastalign.engine.config import GRPOConfig, SFTConfig, load_config
from fastalign.engine.plan import ModelShape, plan_memory, read_model_shape

# V=10, H=4, I=8, 2 layers, 2 heads (head dim 2), 2 KV heads, untied head. Parameters by hand:
#   embeddings 10*4 = 40; per layer: q, k, v, o 4*4 each = 64, gate/up/down 3*4*8 = 96, two norms 8 -> 168;
#   2 layers 336; final norm 4; LM head 40. Total 420.
SMALL = ModelShape(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, source="hand-written")


def test_parameter_count_by_hand():
    assert SMALL.params() == 420
    assert SMALL.lora_params(1, ["q_proj", "v_proj"]) == 2 * (1 * (4 + 4) + 1 * (4 + 4))  # 32


def test_weights_gradients_and_adam_states_exact():
    cfg = load_config(SFTConfig, batch_size=2, max_length=3)
    plan = plan_memory("sft", cfg, 1, shape=SMALL)
    policy = plan.roles[0]
    assert (policy.weights, policy.gradients, policy.optimizer) == (420 * 4, 420 * 4, 2 * 420 * 4)

    bf16 = plan_memory("sft", load_config(SFTConfig, batch_size=2, max_length=3, dtype="bfloat16"), 1, shape=SMALL)
    assert (bf16.roles[0].weights, bf16.roles[0].optimizer) == (420 * 2, 2 * 420 * 2)

    # FSDP2 over 2 processes halves every sharded piece; DDP keeps replicas and doubles the gradients (buckets).
    fsdp = plan_memory("sft", load_config(SFTConfig, batch_size=2, max_length=3, fsdp=True), 2, shape=SMALL)
    assert (fsdp.roles[0].weights, fsdp.roles[0].gradients, fsdp.roles[0].optimizer) == (840, 840, 1680)
    ddp = plan_memory("sft", load_config(SFTConfig, batch_size=2, max_length=3), 2, shape=SMALL)
    assert (ddp.roles[0].weights, ddp.roles[0].gradients) == (1680, 2 * 1680)

    # LoRA: frozen base weights plus 32 float32 adapter parameters, which alone get gradients and Adam states.
    lora = plan_memory("sft", load_config(SFTConfig, batch_size=2, max_length=3, lora_r=1,
                                          lora_target_modules=["q_proj", "v_proj"]), 1, shape=SMALL)
    assert (lora.roles[0].weights, lora.roles[0].gradients, lora.roles[0].optimizer) == (1680 + 128, 128, 256)


def test_tokens_and_reference_roles():
    cfg = load_config(GRPOConfig, batch_size=4, num_generations=2, max_length=10, max_new_tokens=4, beta=0.1)
    plan = plan_memory("grpo", cfg, 2, shape=SMALL)
    assert plan.tokens_per_step == 4 * 2 * 10
    # a process's rollout: 4 completions of 2 groups; the shared-prompt forward runs each prompt (6 tokens) once
    assert (plan.rows_per_microbatch, plan.tokens_per_microbatch, plan.scored_tokens_per_microbatch) == (4, 28, 16)
    assert [r.name for r in plan.roles] == ["policy", "reference"]
    assert plan.roles[1].weights == 420 * 4 and plan.roles[1].gradients == 0
    # KV cache: 4 completions x 10 positions x 2 layers x (k, v) x 4 floats x 4 bytes, plus the last logits
    assert plan.kv_cache == 4 * 10 * 2 * 2 * 4 * 4 + 4 * 10 * 4 * 2
    offloaded = plan_memory("grpo", load_config(GRPOConfig, beta=0.1, reference_offload=True), 1, shape=SMALL)
    assert offloaded.roles[1].weights == 0
    no_ref = plan_memory("grpo", load_config(GRPOConfig, beta=0.0), 1, shape=SMALL)
    assert [r.name for r in no_ref.roles] == ["policy"]


def test_activation_count_matches_what_autograd_saves():
    """The per-token count the plan uses against the bytes a real Llama (GQA, sdpa, padded batch) saves."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastalign.models.heads import CausalLMLogprobs

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).train()
    batch, length = 4, 32
    ids = torch.randint(4, 64, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -5:] = 0  # padding, as in every flow's batches
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        CausalLMLogprobs(lm)(ids, mask, ids.clone())
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    shape = read_model_shape_from(config)
    plan = plan_memory("sft", load_config(SFTConfig, batch_size=batch, micro_batch_size=batch, max_length=length),
                       1, shape=shape)
    assert abs(plan.activations / measured - 1) < 0.05, (plan.activations, measured)


def read_model_shape_from(config) -> ModelShape:
    from fastalign.engine.plan import shape_from_config

    return shape_from_config(config.to_dict(), "test")


def test_known_shape_offline_says_so():
    shape = read_model_shape("Qwen/Qwen2.5-7B-Instruct")
    assert 7.6e9 < shape.params() < 7.65e9  # Qwen2.5-7B: 7.62 B parameters
    assert "built-in table" in shape.source
    assert 8.0e9 < read_model_shape("meta-llama/Meta-Llama-3-8B").params() < 8.05e9  # 8.03 B


@pytest.mark.parametrize("flow", ["sft", "dpo", "grpo", "ppo"])
def test_cli_plans_each_flow_on_tiny(flow, capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--flow", flow, "--model", "tiny", "--batch_size", "8", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert f"fastalign plan: {flow} on tiny" in text and "peak per process" in text and "assumes:" in text
    plan = json.loads(out_json.read_text())
    phases = (plan["training_phase"], plan["optimizer_phase"], plan["generation_phase"])
    assert plan["peak"] == plan["resident"] + max(phases) > 0
    if flow in ("grpo", "ppo"):
        assert plan["kv_cache"] > 0
    if flow == "ppo":
        assert [r["name"] for r in plan["roles"]] == ["policy", "reference", "value model", "reward model"]


def test_cli_plans_a_7b_on_8_gpus_with_fsdp(capsys):
    assert main(["plan", "--flow", "grpo", "--model", "Qwen/Qwen2.5-7B", "--world_size", "8", "--fsdp", "true",
                 "--dtype", "bfloat16", "--beta", "0.04"]) == 0
    text = capsys.readouterr().out
    assert "FSDP2: sharded state / 8" in text and "built-in table" in text


@pytest.mark.parametrize("argv, message", [
    (["--flow", "sft", "--lrr", "1"], "unknown config key 'lrr' in command line (did you mean 'lr'?)"),
    (["--flow", "sft", "--dtype", "fp8"], "config key 'dtype' must be one of"),
    (["--flow", "sft", "--batch_size", "0"], "config key 'batch_size' must be >= 1, got 0"),
    (["--flow", "dance"], "--flow must be one of"),
    (["--flow", "sft", "--model", "no-such/model-xyz"], "model 'no-such/model-xyz' is not 'tiny', a local folder"),
    (["--flow", "sft", "--config", "no-such.yaml"], "config file 'no-such.yaml' does not exist"),
])
def test_cli_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(["plan", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastalign plan: error: ") and message in err and err.count("\n") == 1


def test_cli_world_size_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--flow", "sft", "--world_size", "0"])
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_local_folder_without_config_is_named(tmp_path, capsys):
    assert main(["plan", "--flow", "sft", "--model", str(tmp_path)]) == 1
    assert f"model folder {str(tmp_path)!r} has no config.json" in capsys.readouterr().err


def test_keys_the_plan_does_not_read_are_named(capsys):
    # dynamic_sampling draws extra prompts: the plan does not model it, and says so; lr and loss_type need no memory
    assert main(["plan", "--flow", "grpo", "--dynamic_sampling", "true", "--lr", "1e-5", "--loss_type", "grpo"]) == 0
    assert "not modelled (taken not to change memory): dynamic_sampling\n" in capsys.readouterr().out


def test_token_budget_cuts_the_training_forward():
    # max_tokens_per_microbatch (issue 18 item 2, read when the config has it): 8 rows of 100 tokens, budget 250
    cfg = load_config(SFTConfig, batch_size=8, max_length=100)
    cfg.max_tokens_per_microbatch = 250
    plan = plan_memory("sft", cfg, 1, shape=SMALL)
    assert (plan.rows_per_microbatch, plan.tokens_per_microbatch, plan.scored_tokens_per_microbatch) == (2, 200, 198)
    assert plan.tokens_per_step == 800
