"""`rise run CONFIG --dry-run --cluster-yaml FILE` names the node type each stage launches, as Ray's
own autoscaler scheduler decides it (the cluster twin, tests/test_cluster_twin.py, checks that the
real autoscaler agrees). Fast: no Ray is started."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEANT_FOR = {"gsm8k_mistral7b_self": "gpu8", "gsm8k_llama3_8b_distill": "gpu8", "math_llama3_8b_self": "gpu8",
             "math_mistral7b_distill": "gpu8", "gsm8k_mistral7b_distill": "gpu8", "gsm8k_qwen1.5b": "gpu1",
             "gsm8k_qwen0.5b": "gpu1"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MEANT_FOR))
def test_dry_run_names_the_node_type_of_each_stage(name, capsys):
    from rise_ray.cli import main

    for launcher in ("cluster/aws.yaml", "cluster/gcp.yaml"):
        code = main(["run", f"configs/{name}.yaml", "--dry-run", "--json", "--cluster-yaml", launcher])
        plan = json.loads(capsys.readouterr().out)
        assert code == 0 and plan["verdict"] == "fits", plan["verdict"]
        stages = plan["node_types"]
        assert stages[0]["what"] == "policy engines" and stages[0]["launches"], stages
        assert all(s["on"] == [MEANT_FOR[name]] and not s["unplaced"] for s in stages), (launcher, stages)


def test_the_table_is_printed():
    out = subprocess.run([sys.executable, "-m", "rise_ray.cli", "run", "configs/gsm8k_mistral7b_self.yaml", "--dry-run",
                          "--cluster-yaml", "cluster/aws.yaml"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Node types" in out.stdout and "1 x gpu8" in out.stdout
