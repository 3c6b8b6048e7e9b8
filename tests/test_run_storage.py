"""Every actor that reads the run directory checks, on its own node, that it sees the driver's
marker and the model (rise_ray.models.placement.check_run_storage). Fast: no Ray is started
(the node is named 'this node'); tests/test_multinode.py runs it inside a real engine actor."""

from __future__ import annotations

import json

import pytest

from rise_ray.models.placement import MARKER, check_run_storage, write_run_marker


def test_an_actor_that_sees_the_drivers_marker_passes(tmp_path, tiny_model_dir):
    storage = write_run_marker(str(tmp_path))
    assert storage[0] == str(tmp_path / MARKER) and json.loads((tmp_path / MARKER).read_text())["token"] == storage[1]
    check_run_storage(storage, tiny_model_dir)  # nothing raised
    check_run_storage(None, None)


def test_a_node_with_other_storage_or_none_fails_naming_the_path(tmp_path):
    path, _ = write_run_marker(str(tmp_path))
    with pytest.raises(RuntimeError, match=rf"does not see the run directory the driver writes: {path} is another run's marker"):
        check_run_storage((path, "the-driver's-token"), None)
    missing = str(tmp_path / "not-mounted" / MARKER)
    with pytest.raises(RuntimeError, match=r"not-mounted/\.rise-storage-marker\.json is missing or unreadable here.*Mount the shared storage"):
        check_run_storage((missing, "t"), None)


def test_a_node_that_cannot_read_the_model_fails_naming_it(tmp_path):
    storage = write_run_marker(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"cannot read the model at /nonexistent/model: no directory"):
        check_run_storage(storage, "/nonexistent/model")
