"""The flows, registered once in :data:`FLOWS`: ``fastalign <flow>``, its ``--help`` and the pipeline read it.

A new flow is one module in this package (its ``run(cfg) -> dict`` and its config class, defined there or
imported from :mod:`fastalign.engine.config`) plus one line below. Nothing here imports a flow until it is run
or asked for its help, so ``fastalign --version`` stays quick.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Flow:
    """A command: ``name`` (also its module, ``fastalign.flows.<name>``, unless ``module`` is given), the name of
    its config class (an attribute of that module) and one line of help."""

    name: str
    config: str
    help: str
    module: str = ""

    def load(self):
        return importlib.import_module(self.module or f"{__name__}.{self.name}")

    def config_class(self) -> type:
        return getattr(self.load(), self.config)

    def run(self, cfg) -> dict:
        return self.load().run(cfg)


FLOWS = {flow.name: flow for flow in (
    Flow("sft", "SFTConfig", "supervised fine-tuning"),
    Flow("reward", "RewardConfig", "reward model (Bradley-Terry)"),
    Flow("dpo", "DPOConfig", "DPO (sigmoid | hinge | ipo | robust)"),
    Flow("simpo", "SimPOConfig", "SimPO (reference-free)"),
    Flow("d2o", "D2OConfig", "D²O: human negatives only, K reference samples as the positive (objective: d2o | ga)"),
    Flow("kto", "KTOConfig", "KTO: unpaired desirable/undesirable completions"),
    Flow("orpo", "ORPOConfig", "ORPO (odds ratio + NLL, reference-free)"),
    Flow("cpo", "CPOConfig", "CPO (contrastive + NLL, reference-free)"),
    Flow("ppo", "PPOConfig", "PPO, classic RLHF (policy, reference, reward and value models)"),
    Flow("grpo", "GRPOConfig",
         "GRPO (G samples per prompt, group-relative advantages, verifier/model/function rewards)"),
    Flow("icl", "ICLConfig", "in-context alignment: --mode instruct | forgetting | steer | picle | reflect | all"),
)}
