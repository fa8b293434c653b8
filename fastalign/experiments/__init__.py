"""The lecture's claims as one-command experiments, registered once in :data:`EXPERIMENTS`.

``fastalign experiment <name>`` runs :func:`fastalign.experiments.driver.run_experiment`, which loops over the
seeds, calls the experiment module's ``run_seed`` for each, aggregates (mean ± sd) and writes ``report.md``,
``results.json`` and the module's plots. A new experiment is one module here (``CLAIM``, ``run_seed``,
``plot``, ``findings``) plus one line below. Nothing imports an experiment module until it is run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Experiment:
    """``name`` is the command's argument; ``module`` is ``fastalign.experiments.<module>``."""

    name: str
    module: str
    help: str

    def load(self):
        return importlib.import_module(f"{__name__}.{self.module}")


EXPERIMENTS = {e.name: e for e in (
    Experiment("task-diversity", "task_diversity",
               "instruction tuning on N task families x M examples at fixed N*M: held-out families vs N"),
    Experiment("selection", "selection", "pass@k (k=1..64) of the SFT model and of its GRPO and DPO descendants"),
    Experiment("paradigms", "paradigms",
               "SFT-only, DPO, PPO, GRPO and in-context alignment on one task, one verifier, counted compute"),
    Experiment("overoptimization", "overoptimization",
               "PPO and best-of-n against the learned reward model: gold and proxy reward against KL"),
    Experiment("brittleness", "brittleness",
               "adversarial prompt prefixes against the DPO- and PPO-aligned models: how much comes back"),
    Experiment("forgetting", "forgetting", "value instruction at turn 1 only: adherence by the turn of the query"),
    Experiment("instruction-tax", "instruction_tax",
               "value instruction vs none: behaviour gained and arithmetic lost (alignment tax)"),
)}
