"""``fastalign plan``: the memory each role of a flow takes per GPU, before anything is loaded.

From a flow's config (the same keys and YAML files the flow reads) and the model's shape, it adds up
per process:

* each role's **weights, gradients and AdamW states** (policy; reference; PPO's value and reward
  models): parameter counts from the shape, bytes from ``dtype`` / ``reference_dtype``, trainable
  parameters from LoRA (adapters in float32, as peft keeps them) or ``shared_trunk``; FSDP2 divides
  what it shards by the world size, DDP adds its gradient buckets; offloaded roles take nothing;
* the **training forward's saved activations**, with and without gradient checkpointing, from a
  per-token count of what a Llama-style decoder layer saves for the backward (measured on
  transformers' ``LlamaDecoderLayer``: 8·H + 2·kv + 4·I elements per token and layer; under sdpa or
  eager with a padding mask the keys and values are repeated to all heads (kv = q heads x head dim) and
  one attention-mask row of T elements is kept per token and layer);
* the **LM head**: the logits fastalign keeps (one chunk, ≤ ``FASTALIGN_MEM_BUDGET``) against the
  ``tokens × vocabulary`` float32 logits and log-softmax a materialized head would hold;
* the **KV cache** of a rollout's generation (transformers ``generate``: every completion of a
  process in one batch) and, under FSDP2, the parameters gathered for it.

Peak per process = resident state (weights, gradients, optimizer) + the largest phase (training
forward + head, or generation). Every row is a worst case: sequences at full length
(``max_length``; completions at ``max_new_tokens``). What the estimate assumes is listed with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_STATES = 2  # exp_avg and exp_avg_sq, in the parameter's dtype (torch.optim.AdamW)
FLOWS_PLANNED = ("sft", "reward", "dpo", "simpo", "orpo", "cpo", "kto", "grpo", "ppo")
# Tokens per layer saved for the backward, in elements per token (see the module docstring; a test measures it).
SAVED_PER_HIDDEN, SAVED_PER_KV, SAVED_PER_INTERMEDIATE = 8, 2, 4
SAVED_OUTSIDE_LAYERS = 3  # embeddings output, final norm input and output: x H per token

# Well-known shapes, used when a hub id is not in the local Hugging Face cache (this machine may be offline).
KNOWN_SHAPES = {
    "qwen/qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen/qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen/qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                            num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen/qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen/qwen2.5-14b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                             num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen/qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "meta-llama/meta-llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       tie_word_embeddings=False),
    "meta-llama/llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    tie_word_embeddings=False),
    "meta-llama/llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                    tie_word_embeddings=True),
    "meta-llama/llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                                    num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                                    tie_word_embeddings=True),
    "mistralai/mistral-7b-v0.1": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      tie_word_embeddings=False),
}


def _known_shape_key(model_id: str) -> str | None:
    """The table key of a hub id; '-Instruct' / '-Chat' variants share their base model's shape."""
    key = model_id.lower()
    for suffix in ("-instruct", "-chat", "-it"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key if key in KNOWN_SHAPES else None


# ----------------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs of a Llama-style decoder (Llama, Qwen2, Mistral: the families fastalign loads)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0 = hidden_size / num_attention_heads
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * (self.head_dim or self.hidden_size // self.num_attention_heads)

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * (self.head_dim or self.hidden_size // self.num_attention_heads)

    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attention = h * self.q_dim * 2 + h * self.kv_dim * 2  # q, o; k, v
        return attention + 3 * h * i + 2 * h  # gate, up, down; two RMSNorms

    def head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return embed + self.num_hidden_layers * self.layer_params() + self.hidden_size + self.head_params()

    def lora_params(self, r: int, targets) -> int:
        """Adapter parameters of rank ``r`` on the named linear layers: r x (in + out) each, every layer."""
        h, i = self.hidden_size, self.intermediate_size
        sizes = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                 "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        per_layer = sum(r * sum(sizes[t]) for t in targets if t in sizes)
        return per_layer * self.num_hidden_layers

    def saved_per_token_layer(self, repeated_kv: bool = False) -> int:
        """Elements one decoder layer saves for the backward per token (attention mask row not included);
        ``repeated_kv``: the attention keeps keys and values repeated to every query head (sdpa/eager with a mask)."""
        kv = self.q_dim if repeated_kv else self.kv_dim
        return (SAVED_PER_HIDDEN * self.hidden_size + SAVED_PER_KV * kv
                + SAVED_PER_INTERMEDIATE * self.intermediate_size)


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def shape_from_config(config: dict, source: str) -> ModelShape:
    """A :class:`ModelShape` from a transformers ``config.json`` mapping (a multimodal ``text_config`` too)."""
    config = config.get("text_config", config)
    missing = [k for k in SHAPE_KEYS if not isinstance(config.get(k), int)]
    if missing:
        raise ValueError(f"model config from {source} lacks {missing} (expected a decoder-only causal LM config "
                         f"with {list(SHAPE_KEYS)})")
    return ModelShape(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                      intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
                      num_attention_heads=config["num_attention_heads"],
                      num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                      head_dim=int(config.get("head_dim") or 0), source=source)


def read_model_shape(model: str) -> ModelShape:
    """The shape of ``model``: 'tiny', a local folder with ``config.json``, a hub id in the local Hugging Face
    cache, or a hub id of :data:`KNOWN_SHAPES` (nothing is downloaded)."""
    from fastalign.models import tiny

    if model == tiny.TINY_NAME:
        vocab = len(tiny.SPECIAL_TOKENS) + len(tiny.CHARACTERS)
        return shape_from_config(dict(tiny.TINY_CONFIG, vocab_size=vocab), "the built-in tiny model")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {model!r} has no config.json")
        try:
            config = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"model folder {model!r}: config.json is not valid JSON ({e})") from None
        return shape_from_config(config, f"local folder {model}")
    cached = _cached_hub_config(model)
    if cached is not None:
        return shape_from_config(cached, f"the Hugging Face cache's config of {model}")
    key = _known_shape_key(model)
    if key is not None:
        return shape_from_config(KNOWN_SHAPES[key], f"fastalign's built-in table of well-known shapes ({model}; "
                                                    "not read from the hub: it is not in the local cache)")
    raise ValueError(f"model {model!r} is not 'tiny', a local folder with config.json, a hub id in the local "
                     f"Hugging Face cache, or one of the built-in shapes ({', '.join(sorted(KNOWN_SHAPES))}); "
                     "download its config.json into a folder and pass that folder")


def _cached_hub_config(model_id: str) -> dict | None:
    if model_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(model_id, "config.json")
    if isinstance(found, str) and os.path.isfile(found):
        return json.loads(Path(found).read_text())
    return None


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class Role:
    """One model's resident bytes per process."""

    name: str
    weights: int
    gradients: int = 0
    optimizer: int = 0
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass
class Plan:
    flow: str
    model: str
    shape: ModelShape
    world_size: int
    fsdp: bool
    dtype: str
    roles: list
    rows_per_microbatch: int  # sequences in one training forward of one process
    tokens_per_microbatch: int
    tokens_per_step: int  # over all processes, one optimizer step
    scored_tokens_per_microbatch: int  # positions the LM head scores
    activations: int  # without gradient checkpointing
    activations_checkpointed: int
    gradient_checkpointing: bool
    logits_fastalign: int
    logits_materialized: int
    head_buffers: int = 0  # d(hidden) and, for 16-bit weights, the float32 d(LM head) of the fused loss
    training_gather: int = 0  # FSDP2: layers and the LM head gathered whole during the training forward
    kv_cache: int = 0
    generation_gather: int = 0
    gpu_bytes: int = 0  # the device's memory, when given: the plan says whether the peak fits
    accumulating: bool = False  # several training forwards per optimizer step: gradients live through them
    head_gradient: int = 0  # the LM head's gradient, made first in the backward while the activations still live
    assumptions: list = field(default_factory=list)

    @property
    def gradients(self) -> int:
        return sum(r.gradients for r in self.roles)

    @property
    def resident(self) -> int:
        """Weights and AdamW states: they live through the whole step (gradients are freed after each update)."""
        return sum(r.weights + r.optimizer for r in self.roles)

    @property
    def training_phase(self) -> int:
        acts = self.activations_checkpointed if self.gradient_checkpointing else self.activations
        grads = self.gradients if self.accumulating else self.head_gradient
        return acts + self.logits_fastalign + self.head_buffers + self.training_gather + grads

    @property
    def optimizer_phase(self) -> int:
        """The update: gradients plus AdamW's foreach temporaries (one more gradient-sized buffer at most)."""
        return 2 * self.gradients

    @property
    def generation_phase(self) -> int:
        return self.kv_cache + self.generation_gather

    @property
    def peak(self) -> int:
        return self.resident + max(self.training_phase, self.optimizer_phase, self.generation_phase)

    @property
    def fits(self) -> bool | None:
        return None if not self.gpu_bytes else self.peak <= self.gpu_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["roles"] = [dict(dataclasses.asdict(r), total=r.total) for r in self.roles]
        out.update(gradients=self.gradients, resident=self.resident, training_phase=self.training_phase,
                   optimizer_phase=self.optimizer_phase, generation_phase=self.generation_phase, peak=self.peak,
                   fits=self.fits)
        return out

    def format(self) -> str:
        s = self.shape
        lines = [f"fastalign plan: {self.flow} on {self.model} ({s.params() / 1e9:.3g} B parameters: V={s.vocab_size}, "
                 f"H={s.hidden_size}, I={s.intermediate_size}, {s.num_hidden_layers} layers, "
                 f"{s.num_attention_heads} heads / {s.num_key_value_heads} KV heads), {self.dtype}",
                 f"  shape from {s.source}",
                 f"  {self.world_size} process(es), " + (f"FSDP2: sharded state / {self.world_size}"
                                                          if self.fsdp and self.world_size > 1 else
                                                          "DDP: every process holds a full replica"
                                                          if self.world_size > 1 else "one process"),
                 f"  tokens per optimizer step (all processes): {self.tokens_per_step:,}; per training forward "
                 f"of one process: {self.rows_per_microbatch} sequences, {self.tokens_per_microbatch:,} tokens "
                 f"({self.scored_tokens_per_microbatch:,} scored)",
                 "",
                 f"  {'per process':<22}{'weights':>11}{'gradients':>11}{'optimizer':>11}{'total':>11}"]
        for r in self.roles:
            lines.append(f"  {r.name:<22}{_gib(r.weights):>11}{_gib(r.gradients):>11}{_gib(r.optimizer):>11}"
                         f"{_gib(r.total):>11}" + (f"  {r.note}" if r.note else ""))
        ckpt = "on" if self.gradient_checkpointing else "off"
        lines += [f"  {'sum':<22}{_gib(sum(r.weights for r in self.roles)):>11}{_gib(self.gradients):>11}"
                  f"{_gib(sum(r.optimizer for r in self.roles)):>11}{_gib(self.resident + self.gradients):>11}",
                  "",
                  f"  activations saved for the backward: {_gib(self.activations)} without gradient checkpointing, "
                  f"{_gib(self.activations_checkpointed)} with (checkpointing {ckpt})",
                  f"  LM head logits: fastalign keeps {_gib(self.logits_fastalign)} (token chunks); a materialized "
                  f"head would hold {_gib(self.logits_materialized)} (float32 logits + log-softmax)",
                  f"  fused head buffers (d(hidden), float32 d(LM head) for 16-bit weights): {_gib(self.head_buffers)}"]
        if self.training_gather:
            lines.append(f"  FSDP2 parameters gathered during the training forward (two layers + LM head): "
                         f"{_gib(self.training_gather)}")
        if self.kv_cache:
            lines.append(f"  generation: KV cache {_gib(self.kv_cache)}"
                         + (f" + parameters gathered from the shards {_gib(self.generation_gather)}"
                            if self.generation_gather else ""))
        lines += ["",
                  f"  peak per process: {_gib(self.peak)} = weights + optimizer states {_gib(self.resident)} + "
                  f"max(training {_gib(self.training_phase)}, optimizer step {_gib(self.optimizer_phase)}, "
                  f"generation {_gib(self.generation_phase)})",
                  "    training = activations + head + " + ("all gradients (they accumulate over "
                                                              "micro-batches)" if self.accumulating else
                                                              "the LM head's gradient (one forward per update)"),
                  *([f"  fits in {_gib(self.gpu_bytes)} per GPU: {'yes' if self.fits else 'NO'} "
                     f"({_gib(self.gpu_bytes - self.peak)} left)"] if self.gpu_bytes else []),
                  "  assumes:"] + [f"    - {a}" for a in self.assumptions]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 or n == 0 else f"{n / 2**20:.1f} MiB"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan_memory(flow: str, cfg, world_size: int = 1, shape: ModelShape | None = None,
                value_shape: ModelShape | None = None, gpu_bytes: int = 0) -> Plan:
    """The :class:`Plan` of ``flow`` run with ``cfg`` (its flow's config dataclass) on ``world_size`` processes.

    ``shape`` defaults to ``cfg.init_from or cfg.model``'s; ``value_shape`` (PPO's reward and value models) to
    ``cfg.reward_model``'s when that folder exists, else the policy's. ``gpu_bytes`` (the device's memory, 0 =
    unknown) sizes a colocated vLLM engine and says whether the peak fits."""
    from fastalign.ops.logprobs.chunked import default_mem_budget

    if flow not in FLOWS_PLANNED:
        raise ValueError(f"flow must be one of {', '.join(FLOWS_PLANNED)}, got {flow!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    model = getattr(cfg, "init_from", "") or cfg.model
    shape = shape or read_model_shape(model)
    assumptions = [f"every sequence at full length ({_length_note(flow, cfg)}): padding and packing only "
                   "lower the activations"]
    width = DTYPE_BYTES[cfg.dtype]
    fsdp = bool(cfg.fsdp) and world_size > 1
    shards = world_size if fsdp else 1
    offload_fsdp = bool(getattr(cfg, "fsdp_offload", False)) and fsdp  # issue 18 item 1 adds the key

    # --- sequences and tokens of one training forward -------------------------------------------------------
    prompt_len, completion_len, rows, share_prompts, group = _sequence_shape(flow, cfg, world_size)
    seq_len = prompt_len + completion_len
    if flow in ("grpo", "ppo"):
        prompts_in_forward = _ceil_div(rows, group) if share_prompts else rows
        tokens = prompts_in_forward * prompt_len + rows * completion_len
        scored = rows * completion_len
    else:
        tokens = rows * seq_len
        scored = rows * (seq_len - 1)
    accumulating = _forwards_per_update(flow, cfg, world_size, rows) > 1
    budget = getattr(cfg, "max_tokens_per_microbatch", 0) or 0  # issue 18 item 2 adds the key
    if budget and tokens > max(budget, seq_len):
        # a token budget cuts the forward into micro-batches of at most max(budget, one row) tokens
        per_row, scored_per_row = max(1, tokens // rows), scored // rows
        rows = max(1, max(budget, seq_len) // per_row)
        tokens, scored = rows * per_row, rows * scored_per_row
        accumulating = True
        assumptions.append(f"max_tokens_per_microbatch {budget}: {rows} sequences per training forward")
    tokens_per_step = _tokens_per_step(flow, cfg, seq_len)

    # --- roles -----------------------------------------------------------------------------------------------
    roles = [_policy_role(flow, cfg, shape, width, shards, world_size, fsdp, offload_fsdp, assumptions)]
    # Issue 18 item 1 shards GRPO's and PPO's reference with FSDP2; the other flows keep a full frozen copy per process.
    ref_shards = shards if flow in ("grpo", "ppo") else 1
    if fsdp and ref_shards == 1 and _has_reference(flow, cfg):
        assumptions.append(f"{flow}'s frozen reference is not sharded: a full copy on every process")
    ref = _reference_role(flow, cfg, shape, width, ref_shards)
    if ref is not None:
        roles.append(ref)
    vshape = shape
    if flow == "ppo":
        vshape = value_shape or _reward_shape(cfg, shape, assumptions)
        roles += _ppo_roles(cfg, vshape, width, shards, world_size, fsdp)

    # --- training forward: activations and the LM head -------------------------------------------------------
    trained_layers = (cfg.trainable_top_layers if getattr(cfg, "reference", "") == "shared_trunk"
                      and ref is not None else shape.num_hidden_layers)
    masked = cfg.attn_implementation != "flash_attention_2"  # padded batches pass a mask to sdpa/eager
    mask_row = seq_len if masked else 0
    per_layer = (shape.saved_per_token_layer(masked) + mask_row) * tokens * width
    activations = trained_layers * per_layer + SAVED_OUTSIDE_LAYERS * shape.hidden_size * tokens * width
    checkpointed = trained_layers * shape.hidden_size * tokens * width + per_layer  # layer inputs + one recomputed
    if flow == "ppo" and cfg.value_model == "separate":
        value_per_layer = (vshape.saved_per_token_layer(masked) + mask_row) * tokens * width
        activations += vshape.num_hidden_layers * value_per_layer
        checkpointed += vshape.num_hidden_layers * vshape.hidden_size * tokens * width + value_per_layer
    if flow == "reward":
        scored = 0  # a scalar head: no vocabulary-sized logits
    mem_budget = default_mem_budget()
    logits_kept = min(scored * shape.vocab_size * 4, _round_to_rows(mem_budget, shape.vocab_size))
    head_grad_buffer = 0
    if scored and width != 4 and cfg.lora_r == 0:
        head_grad_buffer = shape.vocab_size * shape.hidden_size * 4  # float32 d(weight), cast once at the end
    head_buffers = scored * shape.hidden_size * 4 + head_grad_buffer
    head_trains = scored and cfg.lora_r == 0 and not (getattr(cfg, "reference", "") == "shared_trunk" and ref)
    head_gradient = shape.vocab_size * shape.hidden_size * width if head_trains else 0
    training_gather = 0
    if fsdp:
        training_gather = (2 * shape.layer_params() + shape.vocab_size * shape.hidden_size) * width
    logits_materialized = scored * shape.vocab_size * 4 * 2
    if scored:
        assumptions.append(f"the LM head works in token chunks within FASTALIGN_MEM_BUDGET = {mem_budget / 2**20:.0f} "
                           "MiB of float32 logits")

    # --- generation -------------------------------------------------------------------------------------------
    kv_cache = gather = 0
    if flow in ("grpo", "ppo"):
        completions = _completions_per_process(flow, cfg, world_size)
        kv_cache = completions * seq_len * shape.num_hidden_layers * 2 * shape.kv_dim * width
        kv_cache += completions * shape.vocab_size * 4 * 2  # the last position's logits and probabilities
        if fsdp:
            gather = shape.params() * width - shape.params() * width // shards
        backend = getattr(cfg, "generation_backend", "hf")
        if backend == "vllm" and gpu_bytes:
            share = vllm_memory_share()
            roles.append(Role("vLLM engine", int(share * gpu_bytes),
                              note=f"colocated: gpu_memory_utilization {share} of the GPU (its weights + KV cache)"))
            kv_cache = 0
            assumptions.append("generation on a colocated vLLM engine (its KV cache lives in its reserved share; "
                               "under FSDP2 the weights it loads each rollout are gathered whole first)")
        else:
            assumptions.append("generation with transformers generate, every completion of a process in one batch"
                               + ("; with vLLM (generation_backend vllm, or auto on a GPU with vLLM installed) give "
                                  "--gpu_gib to count its reserved share instead" if backend != "hf" else ""))
    assumptions.append("AdamW states in the parameters' dtype; gradients live from the backward to the update "
                       "(set to None after it), through every micro-batch when several make one update")
    if cfg.attn_implementation != "flash_attention_2":
        assumptions.append(f"{cfg.attn_implementation} attention keeps keys and values repeated to every head and one "
                           "mask row of T elements per token and layer (flash_attention_2 does not)")
    return Plan(flow=flow, model=model, shape=shape, world_size=world_size, fsdp=fsdp, dtype=cfg.dtype,
                roles=roles, rows_per_microbatch=rows, tokens_per_microbatch=tokens, tokens_per_step=tokens_per_step,
                scored_tokens_per_microbatch=scored, activations=activations, activations_checkpointed=checkpointed,
                gradient_checkpointing=bool(cfg.gradient_checkpointing), logits_fastalign=logits_kept,
                logits_materialized=logits_materialized, head_buffers=head_buffers, training_gather=training_gather,
                kv_cache=kv_cache, generation_gather=gather, gpu_bytes=gpu_bytes,
                accumulating=accumulating, head_gradient=head_gradient,
                assumptions=assumptions)


def vllm_memory_share() -> float:
    """The fraction of the GPU the colocated vLLM engine reserves (``VLLMSampler``'s default)."""
    import inspect

    from fastalign.engine.generation import VLLMSampler

    return inspect.signature(VLLMSampler.__init__).parameters["gpu_memory_utilization"].default


def _round_to_rows(budget: int, vocab: int) -> int:
    return max(1, budget // (4 * vocab)) * 4 * vocab


def _length_note(flow, cfg) -> str:
    if flow in ("grpo", "ppo"):
        return f"prompts of max_length - completion = {cfg.max_length - _completion_len(cfg)} tokens, completions " \
               f"of {_completion_len(cfg)}"
    return f"max_length = {cfg.max_length} tokens"


def _completion_len(cfg) -> int:
    from fastalign.engine.rollouts import max_new_tokens

    return max_new_tokens(cfg)


def _completions_per_process(flow, cfg, world_size) -> int:
    if flow == "grpo":
        return _ceil_div(cfg.batch_size * cfg.num_generations, world_size)
    return _ceil_div(cfg.batch_size, world_size)


def _sequence_shape(flow, cfg, world_size):
    """(prompt tokens, completion tokens, sequences per training forward of one process, shared prompt, group)."""
    if flow in ("grpo", "ppo"):
        completion = _completion_len(cfg)
        prompt = max(cfg.max_length - completion, 1)
        if flow == "grpo":
            rows = cfg.micro_batch_size or _completions_per_process(flow, cfg, world_size)
            share = cfg.share_prompt_forward and not cfg.gradient_checkpointing
            return prompt, completion, rows, share, cfg.num_generations
        return prompt, completion, cfg.mini_batch_size, False, 1
    per_process = _ceil_div(cfg.batch_size, world_size)
    rows = min(cfg.micro_batch_size or per_process, per_process)
    if flow in ("dpo", "simpo", "orpo", "cpo", "reward"):
        rows *= 2  # chosen and rejected rows of each pair
    return 0, cfg.max_length, rows, False, 1


def _forwards_per_update(flow, cfg, world_size, rows) -> int:
    """Training forwards of one process per optimizer step (before any token budget)."""
    if flow == "ppo":
        return 1  # one mini-batch per update
    if flow == "grpo":
        return _ceil_div(_completions_per_process(flow, cfg, world_size), rows)
    pairs = 2 if flow in ("dpo", "simpo", "orpo", "cpo", "reward") else 1
    return _ceil_div(_ceil_div(cfg.batch_size, world_size) * pairs, rows)


def _tokens_per_step(flow, cfg, seq_len) -> int:
    if flow == "grpo":
        return cfg.batch_size * cfg.num_generations * seq_len // cfg.num_iterations
    if flow == "ppo":
        return cfg.mini_batch_size * seq_len
    pairs = 2 if flow in ("dpo", "simpo", "orpo", "cpo", "reward") else 1
    return cfg.batch_size * pairs * seq_len


def _policy_role(flow, cfg, shape, width, shards, world_size, fsdp, offload_fsdp, assumptions) -> Role:
    params = shape.params()
    name = "reward model (trained)" if flow == "reward" else "policy"
    if cfg.lora_r > 0:
        trainable = shape.lora_params(cfg.lora_r, cfg.lora_target_modules)
        weights = params * width // shards + trainable * 4 // shards
        grads, optim, note = trainable * 4, ADAM_STATES * trainable * 4, f"LoRA r={cfg.lora_r}: {trainable:,} " \
                                                                          "float32 adapter parameters train"
    else:
        if getattr(cfg, "reference", "") == "shared_trunk" and _has_reference(flow, cfg):
            trainable = cfg.trainable_top_layers * shape.layer_params()
            note = f"shared_trunk: the top {cfg.trainable_top_layers} layer(s) train"
        else:
            trainable, note = params, ""
        weights = params * width // shards
        grads, optim = trainable * width, ADAM_STATES * trainable * width
    grads, optim = grads // shards, optim // shards
    if world_size > 1 and not fsdp:
        grads *= 2  # DDP's gradient buckets hold a second copy for the all-reduce
        assumptions.append("DDP: gradient buckets double the gradients")
    if offload_fsdp:
        weights, grads, optim = 0, 0, 0
        note = (note + "; " if note else "") + "FSDP2 CPU offload: sharded state lives in host memory"
    return Role(name, weights, grads, optim, note)


def _has_reference(flow, cfg) -> bool:
    if flow in ("dpo", "kto", "ppo"):
        return True
    return flow == "grpo" and cfg.beta > 0


def _reference_role(flow, cfg, shape, width, shards) -> Role | None:
    if not _has_reference(flow, cfg):
        return None
    kind = cfg.reference
    if kind == "frozen_copy":
        ref_width = DTYPE_BYTES[cfg.reference_dtype or cfg.dtype]
        if cfg.reference_offload:
            return Role("reference", 0, note="frozen_copy offloaded to CPU between uses")
        return Role("reference", shape.params() * ref_width // shards, note="frozen_copy")
    if kind == "shared_trunk":
        return Role("reference", cfg.trainable_top_layers * shape.layer_params() * width // shards,
                    note=f"shared_trunk: its own copy of the top {cfg.trainable_top_layers} layer(s)")
    if kind == "adapter":
        return Role("reference", 0, note="adapter: the policy with its LoRA adapters off")
    return Role("reference", 0, note=f"{kind}: log-probs computed before training")


def _reward_shape(cfg, policy_shape, assumptions) -> ModelShape:
    folder = Path(cfg.reward_model) if cfg.reward_model else None
    if folder is not None and (folder / "config.json").is_file():
        return read_model_shape(str(folder))
    assumptions.append("reward and value models have the policy's shape (reward_model is not a readable folder)")
    return policy_shape


def _ppo_roles(cfg, vshape, width, shards, world_size, fsdp) -> list:
    roles = []
    if cfg.value_model == "separate":
        trainable = vshape.params() - vshape.head_params() + vshape.hidden_size + 1  # LM head frozen, scalar head
        grads, optim = trainable * width // shards, ADAM_STATES * trainable * width // shards
        if world_size > 1 and not fsdp:
            grads *= 2
        roles.append(Role("value model", (vshape.params() + vshape.hidden_size + 1) * width // shards, grads, optim,
                          "separate, initialised from the reward model"))
    roles.append(Role("reward model", 0 if cfg.reward_offload else (vshape.params() + vshape.hidden_size + 1) * width,
                      note="offloaded to CPU between uses" if cfg.reward_offload else "frozen, not sharded"))
    return roles


# ------------------------------------------------------------------------------------------------ the command
def plan_command(flow: str, config_path: str | None, overrides: list, world_size: int = 1,
                 gpu_gib: float = 0.0) -> Plan:
    """Load ``flow``'s config like the flow itself (YAML, then ``--key value``; an unknown key is an error), check
    its field ranges, and plan it. The flow's own run-time checks (a reward model folder, FSDP support) are not
    applied: a plan is made before those exist."""
    from fastalign.engine import config as cfgmod
    from fastalign.flows import FLOWS

    if flow not in FLOWS or flow not in FLOWS_PLANNED:
        raise ValueError(f"--flow must be one of {', '.join(f for f in FLOWS_PLANNED if f in FLOWS)}, got {flow!r}")
    cls = FLOWS[flow].config_class()
    resolved: dict = {}
    if config_path:
        data = cfgmod.read_yaml(config_path, "config file") or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {config_path!r} must hold a mapping of key: value, got "
                             f"{type(data).__name__}")
        cfgmod._apply(data, cls, str(config_path), resolved)
    cfgmod._apply(cfgmod.parse_overrides(overrides), cls, "command line", resolved)
    cfg = cls(**resolved)
    cfgmod.TrainConfig.validate(cfg)  # ranges and choices of every key
    plan = plan_memory(flow, cfg, world_size, gpu_bytes=int(gpu_gib * GiB))
    unread = unmodelled_keys(cls, resolved)
    if unread:
        plan.assumptions.append(f"not modelled (taken not to change memory): {', '.join(unread)}")
    return plan


# What the plan reads. Packing and padding are covered by its full-length worst case.
MODELLED_KEYS = frozenset({
    "model", "init_from", "dtype", "attn_implementation", "gradient_checkpointing", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "fsdp", "fsdp_offload", "dataset", "max_length", "packing", "packed",
    "batch_size", "micro_batch_size", "max_tokens_per_microbatch", "num_generations", "max_new_tokens", "beta",
    "reference", "reference_dtype", "reference_offload", "trainable_top_layers", "reward_model", "value_model",
    "reward_offload", "mini_batch_size", "share_prompt_forward", "generation_backend", "num_iterations"})
# Run, optimizer, logging and objective knobs: no memory of their own.
MEMORY_FREE_KEYS = frozenset({
    "warmup_steps", "loss_type", "advantage", "importance_sampling_level", "objective", "kl_estimator", "top_k",
    "ppo_epochs", "whiten_advantages", "use_bias_correction_kl", "rollout_is_correction", "overlong_buffer",
    "name", "output_dir", "seed", "threads", "tokenizer", "eval_dataset", "num_examples", "num_eval_examples",
    "max_steps", "log_every", "save_every", "keep_checkpoints", "resume", "overwrite", "tensorboard", "progress",
    "eval_batch_size", "rewards", "reward_weights", "stop_strings"})


def unmodelled_keys(cls, given: dict) -> list:
    """The keys of ``given`` the plan neither reads nor knows to be memory-free (coefficients, floats, are taken as
    memory-free): e.g. a key another branch added to the flow."""
    import typing

    hints = typing.get_type_hints(cls)
    known = MODELLED_KEYS | MEMORY_FREE_KEYS
    return sorted(k for k in given if k not in known and hints.get(k) is not float)
