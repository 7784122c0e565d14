"""Two processes on this machine (a loopback coordinator, two CPU devices each) protect a folder between them:
each process its own share, the same bytes as one process protecting everything."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anti_i2v_jax as ai
from anti_i2v_jax import distributed
from anti_i2v_jax.errors import UserError
from anti_i2v_jax.io import load_image, save_image

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "protect_folder.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_bytes_of_one(tmp_path, image):
    src = tmp_path / "in"
    for i, im in enumerate([image, image[::-1], image[:, ::-1], np.roll(image, 5, axis=0), image[::-1, ::-1]]):
        save_image(src / f"im{i}.png", np.ascontiguousarray(im))
    common = [sys.executable, str(SCRIPT), str(src), "--backbone", "cogvideox-tiny", "--method", "advdm",
              "--steps", "2", "--chunk-size", "2", "--devices", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

    def two_processes():
        port = _free_port()
        procs = [
            subprocess.Popen([*common, "--out", str(tmp_path / "multi")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                  "JAX_PROCESS_ID": str(p)})
            for p in range(2)
        ]
        try:
            logs = [p.communicate(timeout=240)[0] for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return None, [p.communicate()[0] for p in procs]
        return [p.returncode for p in procs], logs

    # Once in the first six runs here (under load) the two processes never met at start-up (a
    # connection to the coordinator that timed out, cause not found); a second try on a fresh port.
    codes, logs = two_processes()
    if codes != [0, 0]:
        codes, logs = two_processes()
    assert codes == [0, 0], "\n".join(logs)
    assert "process 0 of 2: 3 of them" in logs[0] and "process 1 of 2: 2 of them" in logs[1]
    # One process protecting each image alone (what a single-process run's images equal, tested elsewhere).
    protector = ai.Protector(ai.load_backbone("cogvideox-tiny"),
                             ai.AttackConfig.for_method("advdm", steps=2, chunk_size=2))
    for i in range(5):
        alone = protector.protect([load_image(src / f"im{i}.png")])[0].image
        np.testing.assert_array_equal(load_image(tmp_path / "multi" / f"im{i}_protected.png"), alone)
    assert {p.name for p in (tmp_path / "multi").glob("*.csv")} == {"results.p0-of-2.csv", "results.p1-of-2.csv"}


def test_the_environment_is_checked(monkeypatch):
    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() == (0, 1)  # nothing set: a plain run
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    with pytest.raises(UserError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(UserError, match="not in"):
        distributed.initialize()
    assert distributed.shard(list("abcde"), 1, 2) == ["b", "d"]
