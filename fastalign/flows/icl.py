"""In-context alignment: change behaviour with the prompt alone, measured like the trained methods.

Modes (``mode``), each on the same held-out prompts of ``dataset`` and the same ``judge``, each
writing ``<run>/<mode>.md`` (table), ``<mode>.json`` and ``<mode>.png``:

* ``instruct``   — the value instruction (prompt prefix, or system message with ``chat``) vs none:
  behaviour rate, judge reward, and the alignment tax (``tax_dataset`` accuracy with vs without).
* ``forgetting`` — the instruction only at turn 1 of a conversation whose earlier turns are fillers
  from ``filler_dataset``; adherence as a function of the turn the query is asked at.
* ``steer``      — token-level steering at decode time (:mod:`fastalign.icl.steering`): the
  value-conditioned, plain and contrary branches decoded in one forward per step, combined by
  ``ops.steer_logits``; an alpha sweep, and the time of steered vs plain decoding.
* ``picle``      — K demonstrations chosen by ``log p_target(x) − log p_base(x)`` (p_target = the
  model LoRA-tuned on target-value statements) vs random and similarity-chosen demonstrations.
* ``reflect``    — IROTE-style search for a short self-reflection text (:mod:`fastalign.icl.reflect`)
  on probe prompts of the train split, then its transfer to the held-out prompts.
* ``all``        — every mode above into one run folder.

Assumptions: the model is never trained (PICLe's adapter lives on a copy); decoding is greedy unless
``temperature > 0``; every condition is decoded by the same loop (:func:`steered_generate` with one
branch when nothing is steered), so differences come from the prompt, not the decoder; the judge sees
the original prompt, never the intervention. ``pipeline_rows`` gives the pipeline its table rows.

Run: ``fastalign icl --config configs/icl.yaml --mode steer [--key value ...]``.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch

from fastalign.data import loading, tasks
from fastalign.engine.config import ICLConfig, load_config, save_config
from fastalign.engine.runs import commit_run, start_run, write_json
from fastalign.icl import picle, prompts, report
from fastalign.icl.judge import resolve_judge
from fastalign.icl.reflect import reflect_search
from fastalign.icl.steering import steered_generate
from fastalign.models.loading import load_causal_lm, load_tokenizer

MODES = ("instruct", "forgetting", "steer", "picle", "reflect")


def run(cfg: ICLConfig) -> dict:
    # --- config, run folder, model, judge, held-out prompts ---------------------------------------
    state, run_dir = start_run(cfg, "icl")
    if state.world_size > 1:
        raise ValueError(f"fastalign icl runs in one process (it trains nothing), got world size {state.world_size}")
    ctx = ICLContext(cfg, device=state.device)
    commit_run(run_dir)  # model, judge and prompts loaded: now the run folder is written
    # --- the modes ---------------------------------------------------------------------------------
    results = {}
    for mode in MODES if cfg.mode == "all" else (cfg.mode,):
        t = time.time()
        results[mode] = MODE_RUNNERS[mode](ctx, run_dir)
        results[mode]["seconds"] = round(time.time() - t, 2)
    write_json(run_dir / "eval.json", {"flow": "icl", "run_dir": str(run_dir), "modes": results})
    return results


class ICLContext:
    """What every mode shares: the model and tokenizer, the judge, the held-out rows, decoding and scoring."""

    def __init__(self, cfg: ICLConfig, device=None, lm=None, tokenizer=None):
        self.cfg = cfg
        start = cfg.init_from or cfg.model
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or start)
        self.lm = lm if lm is not None else load_causal_lm(start, dtype=cfg.dtype,
                                                           attn_implementation=cfg.attn_implementation, device=device)
        self.lm.eval()
        self.judge = resolve_judge(cfg.judge, cfg.dataset, self.tokenizer, device=device)
        self.rows = loading.load_rows(cfg.dataset, "prompts", n=cfg.num_eval_examples, seed=cfg.seed, split="eval"
                                      if tasks.parse_task_spec(cfg.dataset) else "test")
        self.tax_rows = (tasks.task_rows(cfg.tax_dataset, "prompts", cfg.num_eval_examples, seed=cfg.seed,
                                         split="eval") if cfg.tax_dataset else [])
        self.failures = {}

    # --- prompts and decoding ------------------------------------------------------------------------
    def encode(self, prompt, instruction="", history=()):
        return prompts.encode(self.tokenizer, prompt, instruction=instruction, history=history, chat=self.cfg.chat,
                              separator=self.cfg.separator)

    def max_new_tokens(self, rows):
        if self.cfg.max_new_tokens:
            return self.cfg.max_new_tokens
        names = {r.get("task") for r in rows} - {None} or set(tasks.parse_task_spec(self.cfg.dataset) or [])
        return max((tasks.get_task(n).max_new_tokens for n in names), default=16)

    def decode(self, branches, rows, *, alpha=0.0, betas=None, top_p=1.0, temperature=None, max_new_tokens=None,
               seed=0):
        """Completion texts for ``branches`` (``[value]`` = plain decoding, else value/base/contrary...)."""
        temperature = self.cfg.temperature if temperature is None else temperature
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + seed) if temperature > 0 else None
        tok = self.tokenizer
        ids = steered_generate(self.lm, branches, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                               max_new_tokens=max_new_tokens or self.max_new_tokens(rows), alpha=alpha, betas=betas,
                               top_p=top_p, temperature=temperature, generator=gen, batch_size=self.cfg.eval_batch_size)
        return [self.tokenizer.decode(c, skip_special_tokens=True) for c in ids]

    # --- measurements ------------------------------------------------------------------------------
    def measure(self, completions, what, rows=None) -> dict:
        """Judge reward, behaviour rate and the task verifiers' metrics of ``completions`` of ``rows``."""
        rows = self.rows if rows is None else rows
        scores = self.judge.score(rows, completions, what=what)
        judged = [r for r in scores.rewards if r is not None]
        out = {"reward": scores.mean(),
               "behaviour_rate": (sum(r >= self.cfg.behaviour_threshold for r in judged) / len(judged)
                                  if judged else None),
               "judge_failures": len(scores.failures)}
        if scores.failures:
            self.failures[what] = scores.failures
        out.update(_task_metrics(rows, completions, self.cfg.dataset))
        return out

    def tax(self, make_branches, **decode_kwargs) -> dict:
        """``tax_dataset`` metrics when its prompts are conditioned the same way (``make_branches(prompts)``)."""
        if not self.tax_rows:
            return {}
        completions = self.decode(make_branches(self.tax_rows), self.tax_rows, **decode_kwargs)
        return _task_metrics(self.tax_rows, completions, self.cfg.tax_dataset)


def _task_metrics(rows, completions, spec) -> dict:
    """``{"<task>/<metric>": ...}`` from the built-in verifiers, for rows of built-in tasks."""
    names = tasks.parse_task_spec(spec) or []
    out = {}
    for name in names:
        picked = [(r, c) for r, c in zip(rows, completions) if r.get("task", name) == name]
        if picked:
            scores = tasks.get_task(name).score([r for r, _ in picked], [c for _, c in picked])
            out.update({f"{name}/{k}": v for k, v in scores.items()})
    return out


def _columns(ctx, extra=()):
    cols = [("behaviour_rate", "behaviour rate"), ("reward", f"reward ({ctx.judge.name})")]
    for name in tasks.parse_task_spec(ctx.cfg.dataset) or []:
        cols += [(f"{name}/{k}", f"{name} {k.replace('_', ' ')}") for k in _metric_names(name)]
    for name in (tasks.parse_task_spec(ctx.cfg.tax_dataset) or []) if ctx.cfg.tax_dataset else []:
        cols += [(f"{name}/{k}", f"{name} {k.replace('_', ' ')} (tax)") for k in _metric_names(name)]
    return cols + list(extra) + [("judge_failures", "judge failures")]


def _metric_names(task):
    return {"arith": ["exact_match"], "pronoun": ["neutral_rate", "stereotype_rate"]}.get(task, [])


def _plain(ctx, instruction="", history_fn=None):
    """``make_branches`` for plain decoding of prompts under ``instruction`` (and per-row history)."""
    return lambda rows: [[ctx.encode(r["prompt"], instruction, history_fn(i) if history_fn else ())
                          for i, r in enumerate(rows)]]


def _finish(ctx, run_dir, mode, title, rows, notes, data=None, extra_columns=()):
    report.write_mode_report(run_dir, mode, title=title, rows=rows, columns=_columns(ctx, extra_columns),
                             notes=notes, data={**(data or {}), "judge": ctx.judge.name,
                                                "judge_failure_details": ctx.failures})
    return {"rows": rows, **(data or {})}


# ------------------------------------------------------------------------------------------------
# instruct: the value instruction vs none
# ------------------------------------------------------------------------------------------------
def run_instruct(ctx: ICLContext, run_dir: Path) -> dict:
    cfg = ctx.cfg
    rows = {}
    for name, instruction in (("no instruction", ""), ("value instruction", cfg.instruction)):
        make = _plain(ctx, instruction)
        rows[name] = ctx.measure(ctx.decode(make(ctx.rows), ctx.rows), what=f"instruct/{name}")
        rows[name].update(ctx.tax(make))
    tax_key = _tax_key(ctx)
    tax = (rows["no instruction"][tax_key] - rows["value instruction"][tax_key]) if tax_key else None
    gain = _diff(rows["value instruction"]["behaviour_rate"], rows["no instruction"]["behaviour_rate"])
    report.bar_plot(run_dir / "instruct.png", _panels(ctx, rows), title=f"instruction {cfg.instruction!r}")
    notes = [f"instruction: {cfg.instruction!r} ({'system message' if cfg.chat else 'prompt prefix'})",
             f"behaviour rate change: {_fmt(gain)}",
             f"alignment tax ({tax_key or 'no tax_dataset'}): {_fmt(tax)} (accuracy without − with the instruction)"]
    return _finish(ctx, run_dir, "instruct", "In-context alignment: value instruction", rows, notes,
                   {"behaviour_gain": gain, "alignment_tax": tax})


# ------------------------------------------------------------------------------------------------
# forgetting: the instruction at turn 1 only, the query at turn t
# ------------------------------------------------------------------------------------------------
def run_forgetting(ctx: ICLContext, run_dir: Path) -> dict:
    cfg = ctx.cfg
    fillers = _filler_turns(cfg, len(ctx.rows) * max(cfg.num_turns - 1, 1))
    per_row = max(cfg.num_turns - 1, 1)
    rows, series = {}, {"instruction at turn 1": [], "no instruction": []}
    for turn in range(1, cfg.num_turns + 1):
        history = lambda i, turn=turn: fillers[i * per_row:i * per_row + turn - 1]  # noqa: E731
        for label, instruction in (("instruction at turn 1", cfg.instruction), ("no instruction", "")):
            completions = ctx.decode(_plain(ctx, instruction, history)(ctx.rows), ctx.rows)
            metrics = ctx.measure(completions, what=f"forgetting/{label}/turn {turn}")
            rows[f"turn {turn}: {label}"] = dict(metrics, turn=turn)
            series[label].append((turn, metrics["behaviour_rate"]))
    report.line_plot(run_dir / "forgetting.png", {"adherence (behaviour rate) by turn of the query": series},
                     xlabel="turn index of the query", title=f"instruction {cfg.instruction!r} at turn 1 only")
    first, last = series["instruction at turn 1"][0][1], series["instruction at turn 1"][-1][1]
    notes = [f"fillers: {cfg.filler_dataset!r} turns, separator {cfg.separator!r}; instruction {cfg.instruction!r}",
             f"adherence at turn 1: {_fmt(first)}, at turn {cfg.num_turns}: {_fmt(last)} "
             f"(drop {_fmt(_diff(first, last))})"]
    return _finish(ctx, run_dir, "forgetting", "In-context alignment: instruction forgetting over turns", rows,
                   notes, {"adherence_by_turn": series}, extra_columns=[("turn", "turn")])


def _filler_turns(cfg, n):
    """``n`` (prompt, completion) filler turns from the train split of ``filler_dataset``."""
    names = tasks.parse_task_spec(cfg.filler_dataset)
    if names == ["pronoun"]:
        # Fillers must not restate the instruction: the pronoun task's tagged rows would re-instruct every turn.
        rows = tasks.get_task("pronoun").sft(n, seed=cfg.seed + 1, split="train", neutral_fraction=0.0)
    else:
        rows = loading.load_rows(cfg.filler_dataset, "sft", n=n, seed=cfg.seed + 1)
    turns = [(r["prompt"], r["completion"]) for r in rows if isinstance(r.get("prompt"), str) and "completion" in r]
    if not turns:
        raise ValueError(f"filler_dataset {cfg.filler_dataset!r} must hold prompt/completion rows, got none")
    return [turns[i % len(turns)] for i in range(n)]


# ------------------------------------------------------------------------------------------------
# steer: value / plain / contrary branches in one forward per step, combined by ops.steer_logits
# ------------------------------------------------------------------------------------------------
def run_steer(ctx: ICLContext, run_dir: Path) -> dict:
    cfg = ctx.cfg
    value_instruction = cfg.steer_instruction or cfg.instruction
    contrary = list(cfg.contrary_instructions)
    betas = cfg.floats("betas") * (len(contrary) if len(cfg.betas) == 1 else 1) if contrary else []

    def branches(rows):
        return [[ctx.encode(r["prompt"], text) for r in rows] for text in [value_instruction, ""] + contrary]

    rows = {}
    for name, make in (("no instruction", _plain(ctx)), ("value instruction", _plain(ctx, value_instruction))):
        rows[name] = dict(ctx.measure(ctx.decode(make(ctx.rows), ctx.rows), what=f"steer/{name}"), **ctx.tax(make))
    sweep = {}
    for alpha in sorted(set(cfg.floats("alphas")) | {cfg.alpha}):
        kwargs = dict(alpha=alpha, betas=betas or None, top_p=cfg.top_p)
        metrics = ctx.measure(ctx.decode(branches(ctx.rows), ctx.rows, **kwargs), what=f"steer/alpha={alpha:g}")
        rows[f"steer alpha={alpha:g}"] = sweep[alpha] = dict(metrics, **ctx.tax(branches, **kwargs), alpha=alpha)
    timing = _steer_timing(ctx, branches) if cfg.timing_batch_sizes else []
    tax_key = _tax_key(ctx)
    panels = {"behaviour rate": {"steered": [(a, m["behaviour_rate"]) for a, m in sweep.items()]}}
    hlines = {"behaviour rate": {"no instruction": rows["no instruction"]["behaviour_rate"],
                                 "value instruction": rows["value instruction"]["behaviour_rate"]}}
    if tax_key:
        panels[f"{tax_key} (tax)"] = {"steered": [(a, m.get(tax_key)) for a, m in sweep.items()]}
        hlines[f"{tax_key} (tax)"] = {"no instruction": rows["no instruction"].get(tax_key)}
    report.line_plot(run_dir / "steer.png", panels, xlabel="alpha", hlines=hlines,
                     title=f"steering: value {value_instruction!r}, {len(contrary)} contrary, top_p={cfg.top_p}")
    notes = [f"value branch {value_instruction!r}, contrary branches {contrary} with betas {betas}, "
             f"top_p {cfg.top_p}; the 'steer' row of the pipeline is alpha={cfg.alpha:g}"]
    notes += [f"timing ({t['prompts']} prompts, batch {t['batch_size']}, "
              f"{'forced ' if t['forced'] else 'up to '}{t['new_tokens']} new tokens): plain {t['plain_s']:.3f} s "
              f"({t['plain_tokens']} tokens), steered with {t['branches']} branches {t['steered_s']:.3f} s "
              f"({t['steered_tokens']} tokens) → {t['wall_ratio']:.2f}× wall, {t['cpu_ratio']:.2f}× CPU time"
              for t in timing]
    return _finish(ctx, run_dir, "steer", "In-context alignment: token-level steering (alpha sweep)", rows, notes,
                   {"alpha": cfg.alpha, "timing": timing}, extra_columns=[("alpha", "alpha")])


def _steer_timing(ctx, branches):
    """Steered decoding with one contrary branch (three branches) vs plain decoding of the value prompts, on the
    same prompts: the task's own completion length (stopping at EOS), and a forced decode-heavy length."""
    cfg, out = ctx.cfg, []
    rows = ctx.rows[:cfg.timing_prompts]
    all_branches = branches(rows)
    three = all_branches[:3] if len(all_branches) >= 3 else all_branches + [all_branches[1]]
    for batch_size in [int(b) for b in cfg.timing_batch_sizes]:
        for forced in (False, True):
            new_tokens = cfg.timing_new_tokens if forced else ctx.max_new_tokens(rows)
            kwargs = dict(pad_id=ctx.tokenizer.pad_token_id, eos_id=None if forced else ctx.tokenizer.eos_token_id,
                          max_new_tokens=new_tokens, batch_size=batch_size)
            plain = _timed(lambda kw=kwargs: steered_generate(ctx.lm, three[:1], **kw), cfg.timing_repeats)
            steered = _timed(lambda kw=kwargs: steered_generate(ctx.lm, three, alpha=cfg.alpha, betas=[1.0],
                                                                top_p=cfg.top_p, **kw), cfg.timing_repeats)
            # Stopping at EOS, the two decodes may run different numbers of steps (a steered "their" is longer
            # than a plain "his"): the tokens decoded are reported beside the times; the forced rows are like for like.
            out.append({"batch_size": batch_size, "new_tokens": new_tokens, "forced": forced, "branches": 3,
                        "prompts": len(rows), "plain_s": plain[0], "steered_s": steered[0],
                        "plain_cpu_s": plain[1], "steered_cpu_s": steered[1], "wall_ratio": steered[0] / plain[0],
                        "cpu_ratio": steered[1] / plain[1], "plain_tokens": sum(map(len, plain[2])),
                        "steered_tokens": sum(map(len, steered[2]))})
    return out


def _timed(fn, repeats):
    """(min wall s, min process-CPU s, the result) over ``repeats`` calls after one warm-up."""
    result = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), result


# ------------------------------------------------------------------------------------------------
# picle: demonstrations by likelihood ratio under a briefly LoRA-tuned target model
# ------------------------------------------------------------------------------------------------
def run_picle(ctx: ICLContext, run_dir: Path) -> dict:
    cfg = ctx.cfg
    pool, statements = _picle_data(ctx)
    texts = [prompts.render_text(p, history=(), separator="") + c for p, c in pool]
    target, losses = picle.lora_tune(ctx.lm, ctx.tokenizer, statements, r=cfg.picle_lora_r,
                                     alpha=2.0 * cfg.picle_lora_r, lr=cfg.picle_lr, steps=cfg.picle_steps,
                                     batch_size=cfg.picle_batch_size, seed=cfg.seed)
    ratio_pick = picle.likelihood_ratio_top_k(picle.text_logprobs(target, ctx.tokenizer, texts),
                                              picle.text_logprobs(ctx.lm, ctx.tokenizer, texts), cfg.num_demos)
    del target
    pool_emb = picle.embeddings(ctx.lm, ctx.tokenizer, texts)
    pool_reward = ctx.judge.score([{"prompt": p, **extra} for (p, _), extra in zip(pool, ctx.pool_extras)],
                                  [c for _, c in pool], what="picle/pool").rewards
    selections = {
        "random demos": lambda rows: picle.random_k(len(rows), len(pool), cfg.num_demos, cfg.seed),
        "similar demos": lambda rows: picle.similar_top_k(
            picle.embeddings(ctx.lm, ctx.tokenizer, [_prompt_text(r["prompt"]) for r in rows]), pool_emb,
            cfg.num_demos),
        "PICLe demos": lambda rows: [ratio_pick] * len(rows),
    }
    rows = {"no demos": dict(ctx.measure(ctx.decode(_plain(ctx)(ctx.rows), ctx.rows), what="picle/none"),
                             **ctx.tax(_plain(ctx)))}
    for name, select in selections.items():
        def make(qrows, select=select):
            picks = select(qrows)
            return [[ctx.encode(r["prompt"], history=[pool[j] for j in picks[i]]) for i, r in enumerate(qrows)]]
        picked = [j for sel in select(ctx.rows) for j in sel]
        on_target = [pool_reward[j] >= cfg.behaviour_threshold for j in picked if pool_reward[j] is not None]
        rows[name] = dict(ctx.measure(ctx.decode(make(ctx.rows), ctx.rows), what=f"picle/{name}"), **ctx.tax(make),
                          demos_on_target=sum(on_target) / max(len(on_target), 1))
    report.bar_plot(run_dir / "picle.png", _panels(ctx, rows, extra={"demos showing the behaviour": {
        k: v.get("demos_on_target") for k, v in rows.items()}}), title=f"K={cfg.num_demos} demonstrations")
    notes = [f"pool: {len(pool)} candidates; p_target: LoRA r={cfg.picle_lora_r} on {len(statements)} statements, "
             f"{cfg.picle_steps} steps (loss {losses[0]:.3f} → {losses[-1]:.3f})",
             "PICLe picks (same for every query): " + "; ".join(repr(texts[j]) for j in ratio_pick)]
    return _finish(ctx, run_dir, "picle", "In-context alignment: PICLe demonstration selection", rows, notes,
                   {"picle_demos": [texts[j] for j in ratio_pick], "lora_losses": losses},
                   extra_columns=[("demos_on_target", "demos showing the behaviour")])


def _picle_data(ctx):
    """(candidate pool as (prompt, completion) pairs, target-value statements as texts); also sets
    ``ctx.pool_extras`` (the columns the judge needs for each candidate)."""
    cfg = ctx.cfg
    if cfg.picle_pool and cfg.picle_statements:
        pool_rows = loading.load_rows(cfg.picle_pool, "sft", n=cfg.picle_pool_size, seed=cfg.seed)
        ctx.pool_extras = [{k: v for k, v in r.items() if k not in ("prompt", "completion")} for r in pool_rows]
        statements = loading.load_rows(cfg.picle_statements, "sft", n=cfg.picle_num_statements, seed=cfg.seed)
        return ([(r["prompt"], r["completion"]) for r in pool_rows],
                [_prompt_text(r["prompt"]) + r["completion"] for r in statements])
    if tasks.parse_task_spec(cfg.dataset) != ["pronoun"]:
        raise ValueError(f"picle needs picle_pool and picle_statements (SFT-format files) for dataset "
                         f"{cfg.dataset!r}; only 'pronoun' has built-in ones")
    # Built-in: candidates are completed train-split sentences as the base SFT data has them (a quarter neutral,
    # the rest mostly stereotyped, no tag); statements are other train sentences completed with "their".
    task = tasks.get_task("pronoun")
    rng = random.Random(f"picle-{cfg.seed}")
    pool_rows = task.prompts(cfg.picle_pool_size, seed=cfg.seed + 11, split="train")
    pool = []
    for r in pool_rows:
        answer = tasks.NEUTRAL if rng.random() < 0.25 else (
            r["stereotype"] if rng.random() < 0.9 else ("his" if r["stereotype"] == "her" else "her"))
        pool.append((r["prompt"], answer))
    ctx.pool_extras = [dict({k: v for k, v in r.items() if k != "prompt"}, task="pronoun") for r in pool_rows]
    statements = [r["prompt"] + tasks.NEUTRAL for r in task.prompts(cfg.picle_num_statements, seed=cfg.seed + 12,
                                                                     split="train")]
    return pool, statements


def _prompt_text(prompt):
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)


# ------------------------------------------------------------------------------------------------
# reflect: search for a compact self-reflection text, then its transfer to held-out prompts
# ------------------------------------------------------------------------------------------------
def run_reflect(ctx: ICLContext, run_dir: Path) -> dict:
    cfg = ctx.cfg
    probes = loading.load_rows(cfg.dataset, "prompts", n=cfg.reflect_probes, seed=cfg.seed + 21, split="train")
    calls = {"n": 0}

    def align(texts):
        all_rows = [r for _ in texts for r in probes]
        branches = [[ctx.encode(r["prompt"], text) for text in texts for r in probes]]
        scores = ctx.judge.score(all_rows, ctx.decode(branches, all_rows), what="reflect/probes").rewards
        out = []
        for k in range(len(texts)):
            ok = [s for s in scores[k * len(probes):(k + 1) * len(probes)] if s is not None]
            out.append(sum(ok) / len(ok) if ok else None)
        return out

    def sample(prefixes):
        calls["n"] += 1
        branch = [loading.encode_prompt(ctx.tokenizer, cfg.reflect_generation_prompt + p) for p in prefixes]
        return ctx.decode([branch], [], temperature=1.0, max_new_tokens=cfg.reflect_max_tokens, seed=100 + calls["n"])

    def length(text):
        return len(ctx.tokenizer(text, add_special_tokens=False)["input_ids"])

    result = reflect_search(align_fn=align, sample_fn=sample, length_fn=length, pool=list(cfg.reflect_pool),
                            rounds=cfg.reflect_rounds, num_generated=cfg.reflect_generated,
                            num_mutations=cfg.reflect_mutations, keep=cfg.reflect_keep,
                            length_penalty=cfg.reflect_length_penalty, seed=cfg.seed)
    first = result.rounds[0]["best_text"]
    rows = {}
    for name, text in (("no instruction", ""), ("best text of round 0", first), ("best reflection", result.best_text)):
        make = _plain(ctx, text)
        rows[name] = dict(ctx.measure(ctx.decode(make(ctx.rows), ctx.rows), what=f"reflect/{name}"), **ctx.tax(make),
                          text=repr(text))
    curve = {"best objective": [(r["round"], r["best_objective"]) for r in result.rounds],
             "best alignment (probes)": [(r["round"], r["best_alignment"]) for r in result.rounds]}
    report.line_plot(run_dir / "reflect.png", {"search on probe prompts": curve}, xlabel="round",
                     title=f"best: {result.best_text!r}")
    notes = [f"best reflection {result.best_text!r}: objective {result.best_objective:.3f} = alignment "
             f"{result.best_alignment:.3f} − {cfg.reflect_length_penalty} × {length(result.best_text)} tokens",
             f"{len(result.scored)} texts scored on {len(probes)} train-split probes over {cfg.reflect_rounds + 1} "
             "rounds; the rows above are the held-out transfer"]
    return _finish(ctx, run_dir, "reflect", "In-context alignment: IROTE-style self-reflection search", rows, notes,
                   {"best_text": result.best_text, "rounds": result.rounds, "scored": result.scored},
                   extra_columns=[("text", "text")])


MODE_RUNNERS = {"instruct": run_instruct, "forgetting": run_forgetting, "steer": run_steer, "picle": run_picle,
                "reflect": run_reflect}


# ------------------------------------------------------------------------------------------------
# helpers for the tables and the pipeline
# ------------------------------------------------------------------------------------------------
def _tax_key(ctx):
    names = tasks.parse_task_spec(ctx.cfg.tax_dataset) if ctx.cfg.tax_dataset else None
    return f"{names[0]}/{_metric_names(names[0])[0]}" if names and _metric_names(names[0]) else None


def _panels(ctx, rows, extra=None):
    panels = {"behaviour rate": {k: v.get("behaviour_rate") for k, v in rows.items()}}
    tax_key = _tax_key(ctx)
    if tax_key:
        panels[f"{tax_key} (tax)"] = {k: v.get(tax_key) for k, v in rows.items()}
    return {**panels, **(extra or {})}


def _diff(a, b):
    return None if a is None or b is None else a - b


def _fmt(x):
    return "—" if x is None else f"{x:+.3f}"


PIPELINE_KEYS = ("pronoun/neutral_rate", "pronoun/stereotype_rate", "arith/exact_match", "behaviour_rate", "reward")


def pipeline_rows(model_dir, tokenizer=None, *, n: int = 100, seed: int = 0, run_dir=None, **overrides) -> dict:
    """The pipeline's ICL rows: ``{"base", "instruct", "steer", "picle", "reflect"}`` → metrics with the
    pipeline's keys (``pronoun/neutral_rate``, ``pronoun/stereotype_rate``, ``arith/exact_match``). Writes each
    mode's table and plot, and the resolved ``config.yaml``, into ``run_dir`` (a temporary folder when None).
    ``overrides`` are ICLConfig keys; every other key keeps ICLConfig's default."""
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="icl-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    values = {"num_eval_examples": n, "seed": seed, **overrides}
    cfg = load_config(ICLConfig, overrides=dict(values, init_from=str(model_dir), mode="all"))
    save_config(cfg, run_dir, echo=False)
    ctx = ICLContext(cfg, tokenizer=tokenizer)
    keep = lambda m: {k: m[k] for k in PIPELINE_KEYS if k in m}  # noqa: E731
    seconds, out = {}, {}
    for mode, pick in (("instruct", ("no instruction", "value instruction")), ("steer", f"steer alpha={cfg.alpha:g}"),
                       ("picle", "PICLe demos"), ("reflect", "best reflection")):
        t = time.time()
        rows = MODE_RUNNERS[mode](ctx, run_dir)["rows"]
        seconds[mode] = round(time.time() - t, 2)
        if mode == "instruct":
            out["base"], out["instruct"] = keep(rows[pick[0]]), keep(rows[pick[1]])
        else:
            out[mode] = keep(rows[pick])
    write_json(run_dir / "pipeline_rows.json", {"rows": out, "seconds": seconds})
    print(f"icl pipeline rows: {seconds} s per mode")
    return out
