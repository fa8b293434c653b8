"""Pieces of the in-context alignment flow (:mod:`fastalign.flows.icl`), one idea per module.

* :mod:`.steering` — steered decoding: value / plain / contrary prompt branches as rows of one batch
  (one forward per step, each branch with its own KV cache), combined by ``ops.steer_logits``.
* :mod:`.judge`    — the judge every mode is scored by (built-in verifier, reward model, ``module:function``).
* :mod:`.prompts`  — conditioned prompts: value instruction, earlier turns, demonstrations.
* :mod:`.picle`    — PICLe demonstration selection by likelihood ratio under a LoRA-tuned target model.
* :mod:`.reflect`  — IROTE-style search for a compact self-reflection text.
* :mod:`.report`   — each mode's table (markdown + json) and plot.
"""
