"""configs/scale/: every recipe loads with its flow's config class, and the plan in its comment is the plan
the recipe's own ``fastalign plan`` line prints today (so the comment cannot drift from the code)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fastalign.cli import main
from fastalign.engine.config import load_config
from fastalign.flows import FLOWS

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "scale").glob("*.yaml"))


def test_there_are_grpo_and_dpo_recipes():
    flows = {recipe_flow(p) for p in RECIPES}
    assert {"grpo", "dpo"} <= flows, [p.name for p in RECIPES]


def recipe_flow(path: Path) -> str:
    launch = re.search(r"^#\s+torchrun .*-m fastalign\.cli (\w+) --config (\S+)", path.read_text(), re.M)
    assert launch, f"{path.name}: no '# torchrun ... -m fastalign.cli <flow> --config <file>' line"
    assert launch.group(2) == f"configs/scale/{path.name}", f"{path.name}: the launch line names {launch.group(2)}"
    return launch.group(1)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_with_its_flow_config(path):
    flow = recipe_flow(path)
    cfg = load_config(FLOWS[flow].config_class(), str(path))
    assert cfg.dtype == "bfloat16"  # the scale recipes are bf16


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_comment_holds_the_current_plan(path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    text = path.read_text()
    command = re.search(r"^# (fastalign plan .*)$", text, re.M)
    assert command, f"{path.name}: no '# fastalign plan ...' line"
    assert main(shlex.split(command.group(1))[1:]) == 0
    printed = capsys.readouterr().out
    peak = re.search(r"peak per process: .*", printed).group(0)
    assert f"#     {peak}\n" in text, f"{path.name}: its plan comment is stale; the plan now says {peak!r}"
