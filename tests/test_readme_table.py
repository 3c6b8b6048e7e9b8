"""The README's table of the embedded default is generated from the committed
bench/results/seeds_default.json (every seed's base and last iteration, the mean, the commit
measured): it fails when someone edits one without the other."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "seeds_default.json"


@pytest.fixture(scope="module")
def seeds():
    spec = importlib.util.spec_from_file_location("bench_seeds", REPO / "bench" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result():
    return json.loads(RESULT.read_text(encoding="utf-8"))


def test_readme_table_is_the_one_generated_from_the_committed_json(seeds, result):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert seeds.readme_block(readme) == seeds.readme_table(result), (
        "README.md's default table differs from bench/results/seeds_default.json: "
        "run `python bench/seeds.py --readme`"
    )


def test_the_json_records_the_commit_and_every_seed(result):
    assert re.fullmatch(r"[0-9a-f]{40}", result["commit"]["commit"])
    assert [s["seed"] for s in result["per_seed"]] == result["seeds"]


def test_a_changed_number_changes_the_table(seeds, result):
    changed = copy.deepcopy(result)
    changed["per_seed"][0]["iterations"][-1]["m1@t5"] += 0.01
    assert seeds.readme_table(changed) != seeds.readme_table(result)


def test_write_readme_replaces_only_the_block(seeds, result, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{seeds.README_BEGIN}\nold table\n{seeds.README_END}\noutro\n", encoding="utf-8")
    seeds.write_readme(str(RESULT), str(readme))
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert seeds.readme_block(text) == seeds.readme_table(result)
