"""Dataclass configs for the flows: loaded from YAML, overridden with ``--key value``, saved per run.

Every knob has a name, a type and a default here; an unknown key or a value of the wrong type
raises ``ValueError`` naming the key. The resolved config is printed and written to
``<run folder>/config.yaml`` so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastalign.ops.policy.spec import PolicyLossType
from fastalign.ops.preference.spec import DpoLossType

# The flows offer the kinds the ops declare (fastalign/ops/*/spec.py), never a copy of the list.
DPO_LOSS_TYPES = DpoLossType.names()
POLICY_LOSS_TYPES = PolicyLossType.names()


def choice(default, options, help=""):
    return field(default=default, metadata={"choices": tuple(options), "help": help})


def knob(default, help="", minimum=None, maximum=None):
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "min": minimum, "max": maximum}, **kwargs)


def check_finite_numbers(key, values):
    """A list knob (strings from YAML or the command line) must hold finite numbers."""
    for v in values:
        try:
            ok = math.isfinite(float(v))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"config key {key!r} must hold finite numbers, got {v!r}")


def check_fsdp_roles(cfg, flow: str):
    """The online flows under FSDP2: what the sharded roles do not support is refused by name."""
    if cfg.fsdp_offload and not cfg.fsdp:
        raise ValueError("config key 'fsdp_offload' needs fsdp: true (it is FSDP2's CPU offload), got fsdp false")
    if not cfg.fsdp:
        return
    if cfg.reference == "shared_trunk" and getattr(cfg, "beta", 1.0) > 0:
        raise ValueError(f"config key 'reference' shared_trunk is not supported by {flow} with fsdp (it reads the "
                         "policy's sharded trunk outside its forward); use frozen_copy or adapter, got shared_trunk")
    if cfg.reference_offload:
        raise ValueError(f"config key 'reference_offload' does not apply with fsdp in {flow} (the sharded reference "
                         "cannot be moved whole); use fsdp_offload: true, got reference_offload true")


# `resume` takes a boolean (as before) or 'auto'; stored as '' (off), 'true' or 'auto' so `if cfg.resume` still reads.
RESUME_ALIASES = {"true": "true", "1": "true", "yes": "true", "on": "true", "false": "", "0": "", "no": "", "off": "",
                  "none": "", "": "", "auto": "auto"}
# Knobs a --resume may change, applied from the checkpoint's step on: the schedule is recomputed from lr,
# max_steps, warmup_steps and min_lr_ratio (see engine.optim); the others are read afresh each step or at the end.
# Any other difference from the checkpoint's config is refused (engine.runs.resume_changes).
RESUME_APPLIED = frozenset({"max_steps", "lr", "warmup_steps", "min_lr_ratio", "max_grad_norm", "save_every",
                            "keep_checkpoints", "log_every", "progress", "tensorboard", "threads", "eval_batch_size",
                            "micro_batch_size", "max_tokens_per_microbatch"})
# What names the run rather than shapes it.
RESUME_IGNORED = frozenset({"name", "output_dir", "resume", "overwrite"})


def resume_mode(cfg) -> str:
    """'' (no resume), 'true' or 'auto' from ``cfg.resume`` (a bool set in code, or any alias)."""
    value = cfg.resume
    key = ("true" if value else "") if isinstance(value, bool) or value is None else str(value).strip().lower()
    if key not in RESUME_ALIASES:
        raise ValueError(f"config key 'resume' must be true, false or auto, got {value!r}")
    return RESUME_ALIASES[key]


@dataclass
class TrainConfig:
    """What every flow shares: run, model, data, optimisation, logging and checkpoints."""

    # run
    name: str = knob("", "run folder name under output_dir (default: <flow>-<timestamp>)")
    output_dir: str = knob("runs", "parent folder of run folders")
    seed: int = knob(0, "seed for data order, initialisation and sampling")
    threads: int = knob(0, "torch.set_num_threads (0 = leave torch's default)", minimum=0)
    # model
    model: str = knob("tiny", "'tiny' (the built-in default), a local folder or a hub id")
    tokenizer: str = knob("", "tokenizer folder or hub id (default: the model's)")
    dtype: str = choice("float32", ("float32", "bfloat16", "float16"), "parameter dtype")
    attn_implementation: str = choice("sdpa", ("sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward")
    lora_r: int = knob(0, "LoRA rank (0 = train all weights)", minimum=0)
    lora_alpha: float = knob(16.0, "LoRA scaling numerator", minimum=0)
    lora_dropout: float = knob(0.0, "LoRA dropout", minimum=0, maximum=1)
    lora_target_modules: list = knob(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    fsdp: bool = knob(False, "shard parameters with FSDP2 fully_shard (else DDP) when world size > 1")
    # data
    dataset: str = knob("arith+pronoun", "built-in task(s) joined by '+', a JSONL/Parquet file or a hub id")
    eval_dataset: str = knob("", "held-out data (default: the tasks' eval split; none for files)")
    num_examples: int = knob(4000, "rows per built-in task, or the first rows of a file (0 = all)", minimum=0)
    num_eval_examples: int = knob(200, "held-out rows per task for the final evaluation", minimum=1)
    max_length: int = knob(128, "tokens per sequence (prompt + completion)", minimum=2)
    packing: bool = knob(False, "padding-free: pack each micro-batch into one row")
    # optimisation
    max_steps: int = knob(100, "optimizer steps", minimum=1)
    batch_size: int = knob(32, "global batch in sequences (pairs for preference flows)", minimum=1)
    micro_batch_size: int = knob(0, "per-process micro-batch (0 = batch_size / world size)", minimum=0)
    max_tokens_per_microbatch: int = knob(0, "micro-batches filled up to this many forwarded tokens per process, "
                                             "balanced by sum of length^2 (0 = off; replaces micro_batch_size)",
                                          minimum=0)
    lr: float = knob(1e-3, "peak learning rate", minimum=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", minimum=0)
    adam_beta1: float = knob(0.9, minimum=0, maximum=1)
    adam_beta2: float = knob(0.98, minimum=0, maximum=1)
    adam_eps: float = knob(1e-8, minimum=0)
    warmup_steps: int = knob(10, "linear warmup steps", minimum=0)
    min_lr_ratio: float = knob(0.1, "cosine decay floor as a fraction of lr", minimum=0, maximum=1)
    max_grad_norm: float = knob(1.0, "gradient clipping (0 = off)", minimum=0)
    # logging, evaluation, checkpoints
    log_every: int = knob(10, "steps between metric lines", minimum=1)
    save_every: int = knob(0, "steps between checkpoints (0 = only the final one)", minimum=0)
    keep_checkpoints: int = knob(2, "checkpoints kept on disk", minimum=1)
    resume: str = field(default="", metadata={
        "choices": ("", "true", "auto"), "aliases": RESUME_ALIASES,
        "help": "continue from the run folder's latest checkpoint ('--resume'; an error when there is none) or "
                "'--resume auto' (start fresh when there is none)"})
    overwrite: bool = knob(False, "replace the run folder's previous run (removed once setup succeeded)")
    tensorboard: bool = knob(False, "also write TensorBoard events (needs tensorboard installed)")
    progress: bool = knob(True, "show a tqdm progress bar")
    eval_batch_size: int = knob(256, "prompts per generation batch in the evaluation", minimum=1)

    def validate(self):
        """Range and choice checks on every field, then cross-field checks."""
        self.resume = resume_mode(self)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"config key {f.name!r} must be one of {list(meta['choices'])}, got {value!r}")
            if hints[f.name] in (int, float) and not math.isfinite(value):
                raise ValueError(f"config key {f.name!r} must be finite, got {value!r}")
            if meta.get("min") is not None and value < meta["min"]:
                raise ValueError(f"config key {f.name!r} must be >= {meta['min']}, got {value!r}")
            if meta.get("max") is not None and value > meta["max"]:
                raise ValueError(f"config key {f.name!r} must be <= {meta['max']}, got {value!r}")
        if self.max_tokens_per_microbatch and self.micro_batch_size:
            raise ValueError(f"config keys 'micro_batch_size' and 'max_tokens_per_microbatch' are two ways to split a "
                             f"batch: set one, got {self.micro_batch_size} and {self.max_tokens_per_microbatch}")
        return self


@dataclass
class SFTConfig(TrainConfig):
    lr: float = knob(3e-3, "peak learning rate", minimum=0)
    batch_size: int = knob(128, "global batch in sequences", minimum=1)
    packed: bool = knob(False, "padding-free training forward: each micro-batch's rows run as one sequence, "
                               "attention kept within each row")


@dataclass
class RewardConfig(TrainConfig):
    init_from: str = knob("", "model to start from (e.g. an SFT run's model/ folder; default: model)")
    center_coef: float = knob(0.01, "reward centering coefficient c·mean((r_w + r_l)²)", minimum=0)
    margin: float = knob(0.0, "Bradley-Terry margin")
    lr: float = knob(1e-3, "peak learning rate", minimum=0)


@dataclass
class DPOConfig(TrainConfig):
    init_from: str = knob("", "policy (and reference) start (e.g. an SFT run's model/ folder; default: model)")
    beta: float = knob(0.1, "KL strength β", minimum=0)
    loss_type: str = choice("sigmoid", DPO_LOSS_TYPES)
    label_smoothing: float = knob(0.0, "sigmoid/robust label smoothing ε", minimum=0, maximum=0.49)
    reference: str = choice("frozen_copy", ("frozen_copy", "precomputed", "adapter", "shared_trunk"),
                            "how the reference model is held (see fastalign.models.reference)")
    reference_dtype: str = choice("", ("", "float32", "bfloat16"), "frozen_copy dtype (default: the policy's)")
    reference_offload: bool = knob(False, "frozen_copy lives on CPU between uses")
    trainable_top_layers: int = knob(1, "shared_trunk: how many top layers the policy trains", minimum=1)
    lr: float = knob(5e-4, "peak learning rate", minimum=0)
    packed: bool = knob(False, "padding-free training forward: each micro-batch's rows run as one sequence, "
                               "attention kept within each row")


@dataclass
class SimPOConfig(TrainConfig):
    init_from: str = knob("", "policy start (e.g. an SFT run's model/ folder; default: model)")
    beta: float = knob(2.0, "SimPO β", minimum=0)
    gamma: float = knob(0.5, "SimPO target margin γ")
    label_smoothing: float = knob(0.0, minimum=0, maximum=0.49)
    lr: float = knob(5e-4, "peak learning rate", minimum=0)


# ------------------------------------------------------------------ D²O, KTO, ORPO, CPO (issue 13)
@dataclass
class ReferenceOptions:
    """The shared reference-model keys of the D²O and KTO flows (``precomputed`` does not apply: their
    reference sequences change with each batch — KTO's mismatched pairs, D²O's resampled responses)."""

    init_from: str = knob("", "policy (and reference) start (e.g. an SFT run's model/ folder; default: model)")
    reference: str = choice("frozen_copy", ("frozen_copy", "adapter", "shared_trunk"),
                            "how the reference model is held (see fastalign.models.reference)")
    reference_dtype: str = choice("", ("", "float32", "bfloat16"), "frozen_copy dtype (default: the policy's)")
    reference_offload: bool = knob(False, "frozen_copy lives on CPU between uses")
    trainable_top_layers: int = knob(1, "shared_trunk: how many top layers the policy trains", minimum=1)


@dataclass
class D2OConfig(ReferenceOptions, TrainConfig):
    """D²O: human negatives only (prompt + rejected); K responses sampled from the reference policy are the
    distributional positive. ``batch_size`` counts prompts (each with K samples + its negative)."""

    dataset: str = knob("pronoun", "prompt + rejected rows: built-in task(s) (their negatives), a JSONL/Parquet "
                                   "file or a hub id (TRL's prompt/rejected columns)")
    objective: str = choice("d2o", ("d2o", "ga"), "d2o, or ga: gradient ascent on the negatives' log-probs "
                                                  "(the paper's baseline, no samples)")
    beta: float = knob(0.1, "D²O β (weight of the K samples' log-ratio)", minimum=0)
    alpha: float = knob(0.1, "D²O α (weight of the negative's log-ratio)", minimum=0)
    num_samples: int = knob(11, "K responses sampled per prompt from the reference policy (paper: 11)", minimum=1)
    resample_every: int = knob(0, "steps between fresh draws of the K samples (0 = drawn once, at the start)",
                               minimum=0)
    max_new_tokens: int = knob(0, "sample length limit (0 = the tasks' own limit; 16 for files)", minimum=0)
    temperature: float = knob(1.0, "sampling temperature", minimum=0)
    top_p: float = knob(1.0, "nucleus sampling mass", minimum=0, maximum=1)
    sample_prefix: str = knob("", "text put before each prompt when (only when) the K samples are drawn, e.g. a value "
                                  "instruction; the loss scores them after the plain prompt ('' = the paper's)")
    batch_size: int = knob(16, "prompts per step (x (K + 1) sequences)", minimum=1)
    lr: float = knob(5e-4, "peak learning rate", minimum=0)

    def validate(self):
        super().validate()
        if self.max_tokens_per_microbatch:
            raise ValueError(f"config key 'max_tokens_per_microbatch' does not apply to d2o: its K samples are drawn "
                             f"when a micro-batch is built, so their lengths are unknown when rows are split "
                             f"(use micro_batch_size), got {self.max_tokens_per_microbatch}")
        return self


@dataclass
class KTOConfig(ReferenceOptions, TrainConfig):
    """KTO on unpaired rows (prompt/completion/label), or paired rows split into a desirable and an
    undesirable half. ``batch_size`` counts completions."""

    beta: float = knob(0.1, "KTO β", minimum=0)
    desirable_weight: float = knob(1.0, "λ_D", minimum=0)
    undesirable_weight: float = knob(1.0, "λ_U", minimum=0)
    lr: float = knob(5e-4, "peak learning rate", minimum=0)

    def validate(self):
        super().validate()
        if self.max_tokens_per_microbatch:
            raise ValueError(f"config key 'max_tokens_per_microbatch' does not apply to kto: its KL pairs match each "
                             f"completion with another row of the same micro-batch, so the split changes the loss "
                             f"(use micro_batch_size), got {self.max_tokens_per_microbatch}")
        return self


@dataclass
class ORPOConfig(TrainConfig):
    init_from: str = knob("", "policy start (e.g. an SFT run's model/ folder; default: model)")
    beta: float = knob(0.1, "ORPO λ: weight of the odds-ratio term (TRL's beta)", minimum=0)
    lr: float = knob(5e-4, "peak learning rate", minimum=0)


@dataclass
class CPOConfig(TrainConfig):
    init_from: str = knob("", "policy start (e.g. an SFT run's model/ folder; default: model)")
    beta: float = knob(0.1, "CPO β", minimum=0)
    alpha: float = knob(1.0, "weight of the chosen NLL (TRL's cpo_alpha)", minimum=0)
    label_smoothing: float = knob(0.0, minimum=0, maximum=0.49)
    lr: float = knob(5e-4, "peak learning rate", minimum=0)


@dataclass
class PPOConfig(TrainConfig):
    """Classic RLHF: ``max_steps`` rollouts of ``batch_size`` prompts, each trained ``ppo_epochs`` times in
    minibatches of ``mini_batch_size`` completions (one optimizer step each)."""

    init_from: str = knob("", "policy (and reference) start (e.g. an SFT run's model/ folder; default: model)")
    reward_model: str = knob("", "a `fastalign reward` run's model/ folder (required)")
    value_model: str = choice("separate", ("separate", "policy_trunk"),
                              "separate: a value model initialised from the reward model; policy_trunk: a value "
                              "head on the policy's trunk (one model, two heads)")
    reference: str = choice("frozen_copy", ("frozen_copy", "adapter", "shared_trunk"),
                            "how the reference model is held (see fastalign.models.reference)")
    reference_dtype: str = choice("", ("", "float32", "bfloat16"), "frozen_copy dtype (default: the policy's)")
    reference_offload: bool = knob(False, "frozen_copy lives on CPU between uses (on a GPU run)")
    fsdp_offload: bool = knob(False, "with fsdp: the sharded parameters, gradients and optimizer state of the "
                                     "policy, value model and reference live on CPU (FSDP2 CPUOffloadPolicy)")
    trainable_top_layers: int = knob(1, "shared_trunk: how many top layers the policy trains", minimum=1)
    reward_offload: bool = knob(False, "the reward model lives on CPU between uses (copied to the device to score)")
    dataset: str = knob("pronoun+arith", "prompts: built-in task(s) joined by '+', a JSONL/Parquet file or a hub id")
    num_examples: int = knob(1000, "prompt rows per built-in task, or the first rows of a file (0 = all)", minimum=0)
    batch_size: int = knob(64, "prompts (one completion each) per rollout", minimum=1)
    mini_batch_size: int = knob(16, "completions per optimizer step; must divide batch_size / world size", minimum=1)
    ppo_epochs: int = knob(4, "passes over each rollout", minimum=1)
    max_steps: int = knob(30, "rollouts (each followed by ppo_epochs x batch / mini_batch optimizer steps)", minimum=1)
    max_new_tokens: int = knob(0, "completion tokens per rollout sample (0 = the tasks' own limit; 16 for files)",
                               minimum=0)
    temperature: float = knob(1.0, "rollout sampling temperature (the loss divides the logits by it too)", minimum=0)
    kl_estimator: str = choice("k1", ("k1", "k3"), "per-token KL estimator folded into the reward")
    kl_coef: float = knob(0.05, "KL penalty β (the adaptive controller's start value)", minimum=0)
    kl_target: float = knob(0.0, "adaptive KL controller's target (nats per completion; 0 = fixed β)", minimum=0)
    kl_horizon: int = knob(10000, "adaptive KL controller's horizon in completions", minimum=1)
    gamma: float = knob(1.0, "GAE discount", minimum=0, maximum=1)
    lam: float = knob(0.95, "GAE λ", minimum=0, maximum=1)
    whiten_advantages: bool = knob(True, "whiten the advantages over each rollout's completion tokens")
    cliprange: float = knob(0.2, "policy ratio clip ε (< 1)", minimum=0)
    cliprange_value: float = knob(0.2, "value clip around the rollout's values", minimum=0)
    vf_coef: float = knob(0.1, "value loss weight", minimum=0)
    entropy_coef: float = knob(0.0, "entropy bonus weight", minimum=0)
    lr: float = knob(1e-4, "peak learning rate (policy and value model)", minimum=0)
    warmup_steps: int = knob(0, "linear warmup, in rollouts", minimum=0)
    min_lr_ratio: float = knob(1.0, "cosine decay floor over the rollouts (1 = constant lr)", minimum=0, maximum=1)
    log_every: int = knob(1, "rollouts between metric lines", minimum=1)
    packed: bool = knob(False, "padding-free training forward: each micro-batch's rows run as one sequence, "
                               "attention kept within each row")

    def validate(self):
        super().validate()
        if not self.reward_model:
            raise ValueError("config key 'reward_model' must name a trained reward model folder (a `fastalign reward` "
                             "run's model/), got ''")
        if self.mini_batch_size > self.batch_size or self.batch_size % self.mini_batch_size:
            raise ValueError(f"config key 'mini_batch_size' must divide batch_size ({self.batch_size}), "
                             f"got {self.mini_batch_size}")
        if not 0 < self.cliprange < 1:
            raise ValueError(f"config key 'cliprange' must be in (0, 1), got {self.cliprange!r}")
        if self.cliprange_value <= 0:
            raise ValueError(f"config key 'cliprange_value' must be > 0, got {self.cliprange_value!r}")
        if self.temperature <= 0:
            raise ValueError(f"config key 'temperature' must be > 0 (PPO samples its rollouts), "
                             f"got {self.temperature!r}")
        check_fsdp_roles(self, "ppo")
        return self


@dataclass
class GRPOConfig(TrainConfig):
    """Group Relative Policy Optimization: each rollout samples ``num_generations`` completions for each of
    ``batch_size`` prompts and is trained ``num_iterations`` times (one optimizer step each); ``max_steps``
    counts optimizer steps."""

    init_from: str = knob("", "policy (and reference) start (e.g. an SFT run's model/ folder; default: model)")
    dataset: str = knob("arith", "prompts: built-in task(s) joined by '+', a JSONL/Parquet file or a hub id")
    rewards: list = knob(["verifier"], "reward sources: 'verifier' (the built-in tasks' checkers), a reward model "
                                       "folder, or 'module:function' (see fastalign.rewards); comma-separated")
    reward_weights: list = knob([], "one weight per reward source (default 1 each); comma-separated")
    num_generations: int = knob(8, "completions sampled per prompt (the group size G)", minimum=2)
    batch_size: int = knob(16, "prompts per rollout (x num_generations completions); divisible by world size",
                           minimum=1)
    micro_batch_size: int = knob(0, "completions per forward/backward (0 = a process's whole rollout)", minimum=0)
    max_new_tokens: int = knob(0, "completion token limit (0 = the tasks' own limit; 16 for files)", minimum=0)
    temperature: float = knob(1.0, "sampling temperature (the loss divides the logits by it too)", minimum=0)
    top_p: float = knob(1.0, "nucleus sampling mass", minimum=0, maximum=1)
    top_k: int = knob(0, "sample among the k most likely tokens (0 = off)", minimum=0)
    stop_strings: list = knob([], "strings that end a completion (besides EOS); comma-separated")
    generation_backend: str = choice("auto", ("auto", "hf", "vllm"),
                                     "auto: vLLM when installed and a GPU is present, else transformers generate")
    advantage: str = choice("group", ("group", "batch", "none", "rloo", "reinforce_pp", "reinforce_pp_baseline"),
                            "group: (r - group mean) / group std; batch: / std of the whole batch; none: no "
                            "division (Dr. GRPO); rloo: r - mean of the other G-1; reinforce_pp(_baseline): "
                            "REINFORCE++ per-token returns (minus the group mean), whitened over the batch")
    loss_type: str = choice("dapo", POLICY_LOSS_TYPES,
                            "token aggregation of the policy loss; cispo: CISPO's objective (epsilon_high is its "
                            "absolute weight cap, e.g. 5), aggregated like dapo")
    epsilon: float = knob(0.2, "ratio clip ε_low", minimum=0)
    epsilon_high: float = knob(0.0, "ratio clip ε_high (0 = epsilon; DAPO uses 0.28)", minimum=0)
    beta: float = knob(0.0, "k3 KL weight against the reference (0 = no reference model is loaded)", minimum=0)
    num_iterations: int = knob(1, "optimizer steps per rollout (>1 reuses it with its stored log-probs)", minimum=1)
    # This year's objectives (issue 12), TRL's names where TRL has one.
    importance_sampling_level: str = choice("token", ("token", "sequence", "sequence_token"),
                                            "importance weight per token, per sequence (GSPO; its paper uses "
                                            "epsilon 3e-4, epsilon_high 4e-4, loss_type grpo) or GSPO-token")
    delta: float = knob(0.0, "two-sided clip: cap of the unclipped ratio, > 1 + epsilon_high (0 = off; "
                             "INTELLECT-2 uses 4)", minimum=0)
    ratio_clip_c: float = knob(0.0, "dual clip: a token with A < 0 loses at most -c A, c > 1 (0 = off)", minimum=0)
    use_bias_correction_kl: bool = knob(True, "multiply the k3 KL term by the importance weight (TRL's default; "
                                              "only matters when beta > 0)")
    off_policy_mask_threshold: float = knob(-1.0, "drop a sequence with A < 0 whose mean (sampling - policy) "
                                                  "log-prob exceeds this (DeepSeek-V3.2; < 0 = off)")
    top_entropy_quantile: float = knob(1.0, "fraction of valid tokens, by entropy over all processes, that get "
                                            "policy gradient (0.2 = '80/20'; 1 = all)", minimum=0, maximum=1)
    entropy_coef: float = knob(0.0, "entropy bonus: loss -= coef x mean entropy of the trained tokens", minimum=0)
    rollout_is_correction: str = choice("none", ("none", "token_truncate", "token_mask", "sequence_truncate",
                                                 "sequence_mask"),
                                        "sampler/trainer mismatch weights exp(old - sampler log-prob) (TRL's "
                                        "vllm_importance_sampling_mode; TRL's default is sequence_mask)")
    rollout_is_low: float = knob(0.0, "lower bound of the rollout weight (0 = none)", minimum=0)
    rollout_is_high: float = knob(3.0, "upper bound of the rollout weight (TRL: vllm_importance_sampling_clip_max)",
                                  minimum=0)
    dynamic_sampling: bool = knob(False, "DAPO: drop groups whose rewards are all equal and sample more prompts "
                                         "until the batch is full")
    max_sampling_rounds: int = knob(3, "dynamic sampling: most sampling rounds per rollout", minimum=1)
    overlong_buffer: int = knob(0, "DAPO soft overlong punishment: the last L_c tokens before max_new_tokens "
                                   "(0 = off)", minimum=0)
    overlong_penalty: float = knob(1.0, "overlong punishment at max_new_tokens (scales (L_max - L_c - |y|) / L_c)",
                                   minimum=0)
    share_prompt_forward: bool = knob(True, "the training forward runs each distinct prompt once for its G samples "
                                            "(off, or under gradient checkpointing: prompt + completion per row)")
    packed: bool = knob(False, "padding-free training forward: the micro-batch's rows run as one sequence, attention "
                               "kept within each row (replaces share_prompt_forward)")
    reference: str = choice("frozen_copy", ("frozen_copy", "adapter", "shared_trunk"),
                            "how the reference model is held when beta > 0 (see fastalign.models.reference)")
    reference_dtype: str = choice("", ("", "float32", "bfloat16"), "frozen_copy dtype (default: the policy's)")
    reference_offload: bool = knob(False, "frozen_copy lives on CPU between uses (on a GPU run)")
    fsdp_offload: bool = knob(False, "with fsdp: the sharded parameters, gradients and optimizer state of the "
                                     "policy, value model and reference live on CPU (FSDP2 CPUOffloadPolicy)")
    trainable_top_layers: int = knob(1, "shared_trunk: how many top layers the policy trains", minimum=1)
    lr: float = knob(1e-4, "peak learning rate", minimum=0)
    warmup_steps: int = knob(0, "linear warmup steps", minimum=0)
    min_lr_ratio: float = knob(1.0, "cosine decay floor (1 = constant lr)", minimum=0, maximum=1)
    log_every: int = knob(1, "steps between metric lines", minimum=1)

    def validate(self):
        super().validate()
        if not self.rewards:
            raise ValueError("config key 'rewards' must name at least one reward source, got []")
        if self.reward_weights:
            if len(self.reward_weights) != len(self.rewards):
                raise ValueError(f"config key 'reward_weights' must have one weight per reward ({len(self.rewards)}), "
                                 f"got {len(self.reward_weights)}")
            check_finite_numbers("reward_weights", self.reward_weights)
        if not self.epsilon < 1:
            raise ValueError(f"config key 'epsilon' must be in [0, 1), got {self.epsilon!r}")
        if self.micro_batch_size and (self.batch_size * self.num_generations) % self.micro_batch_size:
            raise ValueError(f"config key 'micro_batch_size' must divide the completions per rollout "
                             f"(batch_size x num_generations = {self.batch_size * self.num_generations}), "
                             f"got {self.micro_batch_size}")
        if self.temperature <= 0:
            raise ValueError(f"config key 'temperature' must be > 0 (greedy groups are identical: no advantage), "
                             f"got {self.temperature!r}")
        if self.beta > 0 and self.reference == "shared_trunk" and self.temperature != 1.0:
            raise ValueError(f"config key 'temperature' must be 1 with reference 'shared_trunk' (its log-probs are "
                             f"read at temperature 1), got {self.temperature!r}")
        high = self.epsilon_high or self.epsilon
        if self.delta and not self.delta > 1 + high:
            raise ValueError(f"config key 'delta' must be > 1 + epsilon_high = {1 + high} (or 0 = off), "
                             f"got {self.delta!r}")
        if self.ratio_clip_c and not self.ratio_clip_c > 1:
            raise ValueError(f"config key 'ratio_clip_c' must be > 1 (or 0 = off), got {self.ratio_clip_c!r}")
        if self.loss_type == "cispo" and not self.epsilon_high:
            raise ValueError("config key 'epsilon_high' must be set for loss_type cispo (the absolute cap on the "
                             "importance weight, e.g. 5.0), got 0")
        if self.loss_type == "cispo" and (self.delta or self.ratio_clip_c):
            raise ValueError("config keys 'delta' and 'ratio_clip_c' apply to the clipped objective, not to "
                             f"loss_type cispo; got delta={self.delta}, ratio_clip_c={self.ratio_clip_c}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(f"config key 'top_entropy_quantile' must be in (0, 1], got {self.top_entropy_quantile!r}")
        if self.rollout_is_correction != "none" and self.rollout_is_low > self.rollout_is_high:
            raise ValueError(f"config key 'rollout_is_low' must be <= rollout_is_high ({self.rollout_is_high}), "
                             f"got {self.rollout_is_low!r}")
        if self.advantage == "reinforce_pp_baseline" and self.num_generations < 2:
            raise ValueError("config key 'advantage' reinforce_pp_baseline needs num_generations >= 2")
        check_fsdp_roles(self, "grpo")
        if self.max_tokens_per_microbatch and self.loss_type == "bnpo":
            raise ValueError("config key 'max_tokens_per_microbatch' does not apply to loss_type bnpo: its normalizer "
                             "is each micro-batch's token count, so the split changes the loss (use dapo, grpo or "
                             f"dr_grpo, or micro_batch_size), got {self.max_tokens_per_microbatch}")
        if self.max_tokens_per_microbatch and self.entropy_coef and self.loss_type in ("grpo", "dr_grpo"):
            raise ValueError(f"config key 'max_tokens_per_microbatch' does not apply with entropy_coef > 0 and "
                             f"loss_type {self.loss_type}: that entropy bonus is a token mean over each micro-batch, "
                             f"so the split changes the loss (use dapo), got {self.max_tokens_per_microbatch}")
        if self.max_tokens_per_microbatch and self.top_entropy_quantile < 1:
            raise ValueError("config key 'max_tokens_per_microbatch' does not apply with top_entropy_quantile < 1: the "
                             "entropy quantile is taken over each micro-batch, so the split changes the loss, got "
                             f"{self.max_tokens_per_microbatch}")
        return self


@dataclass
class ICLConfig(TrainConfig):
    """In-context alignment: change behaviour with the prompt alone (nothing of the model is trained; only
    PICLe's p_target adapter, with the ``picle_*`` knobs). Every mode is measured on the held-out prompts of
    ``dataset`` by the same ``judge``, and the alignment tax on ``tax_dataset``."""

    mode: str = choice("instruct", ("instruct", "forgetting", "steer", "picle", "reflect", "all"),
                       "instruct | forgetting | steer | picle | reflect | all (each writes <mode>.md/.json/.png)")
    init_from: str = knob("", "model to condition (e.g. an SFT run's model/ folder; default: model)")
    dataset: str = knob("pronoun", "behaviour prompts: a built-in task or a prompt-only file (held-out split)")
    tax_dataset: str = knob("arith", "built-in task whose accuracy measures the alignment tax ('' = none)")
    judge: str = knob("", "'' = the built-in verifier; a reward-model folder; or 'module:function'")
    behaviour_threshold: float = knob(0.5, "a response shows the behaviour when its judge reward >= this")
    num_eval_examples: int = knob(200, "held-out prompts per task", minimum=1)
    instruction: str = knob("[neutral] ", "the value instruction: prompt prefix (plain) or system message (chat)")
    chat: bool = knob(False, "render prompts with the chat template (instruction = system message)")
    separator: str = knob("\n", "plain format: text between conversation turns / demonstrations")
    max_new_tokens: int = knob(0, "completion token limit (0 = the task's own; 16 for files)", minimum=0)
    temperature: float = knob(0.0, "decoding temperature (0 = greedy)", minimum=0)
    # forgetting
    num_turns: int = knob(8, "forgetting: conversation length; the query is asked at turns 1..num_turns", minimum=1)
    filler_dataset: str = knob("pronoun", "forgetting: filler turns (a built-in task or an SFT-format file)")
    # steer
    steer_instruction: str = knob("", "steer: the value-conditioned branch's instruction (default: instruction)")
    contrary_instructions: list = knob(["12+34=46\n"], "steer: one contrary prompt prefix per negative branch")
    betas: list = knob(["0.5"], "steer: weight of each contrary branch (one value = the same for all)")
    alphas: list = knob(["0", "0.5", "1", "2", "4"], "steer: the alpha sweep")
    alpha: float = knob(2.0, "steer: the alpha of the reported 'steer' row")
    top_p: float = knob(0.9, "steer: plausibility mask mass of the value-conditioned distribution", minimum=0,
                        maximum=1)
    timing_batch_sizes: list = knob(["64", "8"], "steer: prompts per batch for the plain-vs-steered timing ([] = "
                                                 "no timing)")
    timing_prompts: int = knob(64, "steer: held-out prompts the timing decodes", minimum=1)
    timing_new_tokens: int = knob(32, "steer: forced completion length of the decode-heavy timing", minimum=1)
    timing_repeats: int = knob(2, "steer: timing repeats (the minimum is reported)", minimum=1)
    # picle
    num_demos: int = knob(3, "picle: demonstrations prepended (K)", minimum=1)
    picle_pool: str = knob("", "picle: candidate demonstrations, an SFT-format file (default: the task's train rows)")
    picle_pool_size: int = knob(64, "picle: candidates drawn from the pool", minimum=1)
    picle_statements: str = knob("", "picle: target-value statements, an SFT-format file (default: the task's)")
    picle_num_statements: int = knob(64, "picle: statements p_target is tuned on", minimum=1)
    picle_steps: int = knob(30, "picle: LoRA steps for p_target", minimum=1)
    picle_lr: float = knob(3e-3, "picle: LoRA learning rate", minimum=0)
    picle_batch_size: int = knob(16, "picle: statements per LoRA step", minimum=1)
    picle_lora_r: int = knob(8, "picle: LoRA rank", minimum=1)
    # reflect
    reflect_rounds: int = knob(3, "reflect: search rounds after the initial one", minimum=0)
    reflect_generated: int = knob(8, "reflect: texts the model writes per round", minimum=0)
    reflect_mutations: int = knob(8, "reflect: mutations of the kept texts per round", minimum=0)
    reflect_keep: int = knob(4, "reflect: texts kept between rounds (top k)", minimum=1)
    reflect_length_penalty: float = knob(0.01, "reflect: lambda, objective = alignment - lambda * tokens", minimum=0)
    reflect_probes: int = knob(32, "reflect: probe prompts (train split) each candidate is scored on", minimum=1)
    reflect_pool: list = knob(["Use neutral words. ", "Be fair to everyone. ", "neutral ", "(fair) "],
                              "reflect: seed texts (scored in round 0, prefixes seed the model's own texts)")
    reflect_generation_prompt: str = knob("", "reflect: text the model continues to write a reflection")
    reflect_max_tokens: int = knob(12, "reflect: tokens the model writes per text", minimum=1)

    def floats(self, key: str) -> list:
        """A list knob as floats (validated)."""
        return [float(v) for v in getattr(self, key)]

    def validate(self):
        super().validate()
        for key in ("betas", "alphas"):
            check_finite_numbers(key, getattr(self, key))
        if not self.alphas:
            raise ValueError("config key 'alphas' must hold at least one alpha, got []")
        if len(self.betas) not in (1, len(self.contrary_instructions)) and self.contrary_instructions:
            raise ValueError(f"config key 'betas' must hold one value or one per contrary instruction "
                             f"({len(self.contrary_instructions)}), got {len(self.betas)}")
        if not self.top_p > 0:
            raise ValueError(f"config key 'top_p' must be in (0, 1], got {self.top_p!r}")
        for v in self.timing_batch_sizes:
            if not str(v).isdigit() or int(v) < 1:
                raise ValueError(f"config key 'timing_batch_sizes' must hold integers >= 1, got {v!r}")
        return self


def _convert(key, value, kind, source):
    """``value`` (from YAML or a command-line string) as ``kind``, or ValueError naming the key."""
    bad = lambda: ValueError(f"config key {key!r} ({source}) must be {kind.__name__}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad()
    if kind is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise bad() from None
    if kind is float:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if kind is list:
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise bad()
    if kind is str:
        if isinstance(value, (dict, list)):
            raise bad()
        return "" if value is None else str(value)
    raise TypeError(f"config key {key!r} has an unsupported type {kind!r}")


def _apply(values: dict, cls, source: str, into: dict):
    hints = typing.get_type_hints(cls)
    aliases = {f.name: f.metadata["aliases"] for f in dataclasses.fields(cls) if "aliases" in f.metadata}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {raw_key!r} in {source}{hint}; {cls.__name__} knows: "
                             f"{', '.join(sorted(hints))}")
        if key in aliases:
            text = ("true" if value else "false") if isinstance(value, bool) else str(value).strip().lower()
            if text not in aliases[key]:
                raise ValueError(f"config key {key!r} ({source}) must be one of {sorted(set(aliases[key]) - {''})}, "
                                 f"got {value!r}")
            value = aliases[key][text]
        into[key] = _convert(key, value, hints[key], source)


def parse_overrides(argv):
    """``["--lr", "1e-3", "--packing", "--name=x"]`` → ``{"lr": "1e-3", "packing": "true", "name": "x"}``."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected an override '--key value', got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 2
        else:  # a bare flag means true
            key, value = arg[2:], "true"
            i += 1
        out[key] = value
    return out


def load_config(cls, path=None, overrides=None, **values):
    """A validated ``cls`` from an optional YAML file, then ``overrides`` (argv list or dict), then ``values``."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        got = f"an instance of {type(cls).__name__}" if dataclasses.is_dataclass(cls) else repr(cls)
        raise TypeError(f"load_config: cls must be a config class such as SFTConfig, got {got} (pass the class; "
                        f"an existing config is changed with dataclasses.replace)")
    resolved: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = read_yaml(p, "config file") or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}")
        _apply(data, cls, str(path), resolved)
    if overrides:
        _apply(parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else overrides, cls,
               "command line", resolved)
    _apply(values, cls, "arguments", resolved)
    return cls(**resolved).validate()


def read_yaml(path, what="YAML file"):
    """``yaml.safe_load`` of a file; a syntax or encoding error is one ValueError naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise ValueError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}"
                         f"{f' ({context})' if context else ''}") from None


def describe(cls) -> str:
    """One line per knob of ``cls``: ``--key (type, default): help [choices]``, for ``--help``."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        extra = f" [{' | '.join(map(str, f.metadata['choices']))}]" if "choices" in f.metadata else ""
        text = f": {f.metadata['help']}" if f.metadata.get("help") else ""
        lines.append(f"  --{f.name} ({hints[f.name].__name__}, default {default!r}){text}{extra}")
    return "\n".join(lines)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, run_dir: Path, echo: bool = True) -> Path:
    """Write ``config.yaml`` into the run folder (and print it when ``echo``)."""
    text = yaml.safe_dump(config_dict(cfg), sort_keys=False)
    path = Path(run_dir) / "config.yaml"
    path.write_text(text)
    if echo:
        print(f"config ({type(cfg).__name__}) → {path}\n" + "".join(f"  {line}\n" for line in text.splitlines()))
    return path
