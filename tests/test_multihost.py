"""Multi-host training and the Cloud TPU launcher (launch/tpu.py).

Default tests: the exact ``gcloud`` commands of ``python -m launch.tpu --dry-run``, when
`mtl_jax.main.initialize_distributed` calls `jax.distributed.initialize`, the harness giving
each process its shard of the data, and process 1 writing no summaries. `slow`: two real
processes (4 simulated CPU devices each, gloo collectives) run ``python -m mtl_jax.main`` with
``--config.distributed=True`` on one 8-device mesh and match a single-process run; only
process 0 writes results.json and TensorBoard events.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from launch import tpu
from mtl_jax import main as main_lib
from mtl_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- launch/tpu.py --dry-run --------------------------------------------------------------------

ARGS = [
    "--project=my-project", "--zone=us-west4-a", "--name=mtl-v5e",
    "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
    "--config=experiments/nyud.py", "--workdir=/mnt/shared/runs/nyud_upgrad",
    "--data-src=gs://my-bucket/nyuv2",
]  # fmt: skip
SCOPE = "--project=my-project --zone=us-west4-a"
SSH = f"gcloud compute tpus tpu-vm ssh mtl-v5e {SCOPE} --worker=all"
EXPECTED_ALL = [
    "# create",
    f"gcloud compute tpus tpu-vm create mtl-v5e {SCOPE} --accelerator-type=v5litepod-16 "
    "--version=v2-alpha-tpuv5-lite",
    "# setup",
    "git archive --format=tar.gz --output=/tmp/mtl-v5e-mtl_jax.tar.gz HEAD",
    "gcloud compute tpus tpu-vm scp /tmp/mtl-v5e-mtl_jax.tar.gz 'mtl-v5e:~/mtl_jax.tar.gz' "
    f"{SCOPE} --worker=all",
    f"{SSH} '--command=rm -rf ~/mtl_jax && mkdir -p ~/mtl_jax && tar -xzf ~/mtl_jax.tar.gz -C "
    "~/mtl_jax && cd ~/mtl_jax && python3 -m pip install -U '\"'\"'jax[tpu]'\"'\"' -e "
    "'\"'\"'.[data]'\"'\"''",
    "# data",
    f"{SSH} '--command=mkdir -p /tmp/mtl_jax_data && gcloud storage rsync --recursive "
    "gs://my-bucket/nyuv2 /tmp/mtl_jax_data'",
    "# run",
    f"{SSH} '--command=set -o pipefail; cd ~/mtl_jax && MTL_JAX_DISTRIBUTED=1 python3 -m "
    "mtl_jax.main --config=experiments/nyud.py --workdir=/mnt/shared/runs/nyud_upgrad "
    "--config.data_dir=/tmp/mtl_jax_data --config.balancer=upgrad 2>&1 | tee "
    "~/mtl_jax_mtl-v5e.log'",
    "# delete",
    f"gcloud compute tpus tpu-vm delete mtl-v5e {SCOPE} --quiet",
]


def test_dry_run_prints_the_exact_gcloud_commands(capsys):
    tpu.main(["all", "--dry-run", *ARGS, "--", "--config.balancer=upgrad"])
    assert capsys.readouterr().out.splitlines() == EXPECTED_ALL


def test_dry_run_of_a_queued_spot_resource(capsys):
    tpu.main(["create", "--dry-run", "--queued", "--spot", *ARGS])
    assert capsys.readouterr().out.splitlines() == [
        "# create",
        f"gcloud compute tpus queued-resources create mtl-v5e {SCOPE} --node-id=mtl-v5e "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
        f"gcloud compute tpus queued-resources describe mtl-v5e {SCOPE} "
        "'--format=value(state.state)'  # repeated until ACTIVE",
    ]
    tpu.main(["delete", "--dry-run", "--queued", *ARGS])
    assert capsys.readouterr().out.splitlines()[1] == (
        f"gcloud compute tpus queued-resources delete mtl-v5e {SCOPE} --force --quiet"
    )


def test_embedded_dataset_needs_no_data_step(capsys):
    tpu.main(["all", "--dry-run", "--project=p", "--zone=z", "--name=n"])
    out = capsys.readouterr().out
    assert "storage rsync" not in out and "--config.data_dir" not in out
    assert "--config=experiments/multidigits.py --workdir=/tmp/mtl_jax_work" in out


def test_execute_runs_the_commands_and_always_deletes(monkeypatch):
    calls = []

    def fake_run(cmd, check=False, **kw):
        calls.append(cmd)
        if (
            cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n"]
            and "mtl_jax.main" in (cmd[-1])
        ):
            raise subprocess.CalledProcessError(1, cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(tpu.subprocess, "run", fake_run)
    target, steps, dry = tpu.parse_args(["all", "--project=p", "--zone=z", "--name=n"])
    with pytest.raises(subprocess.CalledProcessError):
        tpu.execute(target, steps)
    assert calls[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert calls[-1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]  # despite failure


# -- jax.distributed and per-process behaviour ---------------------------------------------------


def test_initialize_distributed_flag_and_env(monkeypatch):
    import ml_collections

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("MTL_JAX_DISTRIBUTED", raising=False)
    monkeypatch.delenv("MTL_JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("MTL_JAX_PROCESS_ID", raising=False)
    off = ml_collections.ConfigDict({"distributed": False})
    assert not main_lib.initialize_distributed(off) and calls == []
    assert main_lib.initialize_distributed(ml_collections.ConfigDict({"distributed": True}))
    assert calls == [{}]
    monkeypatch.setenv("MTL_JAX_DISTRIBUTED", "1")
    monkeypatch.setenv("MTL_JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("MTL_JAX_PROCESS_ID", "2")
    assert main_lib.initialize_distributed(off)
    assert calls[-1] == {"num_processes": 4, "process_id": 2}
    monkeypatch.setenv("MTL_JAX_DISTRIBUTED", "yes please")
    with pytest.raises(ValueError, match="MTL_JAX_DISTRIBUTED"):
        main_lib.initialize_distributed(off)


def test_each_process_reads_its_shard_of_the_batch(monkeypatch, tmp_path):
    # Process 1 of 2: the harness asks the loader for shard 1 of 2 and half the global batch.
    from mtl_jax import data as data_lib

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_sharding import penguins_config

    seen = []

    class Stop(Exception):
        pass

    def fake_make_loader(*args, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(data_lib, "make_loader", fake_make_loader)
    with pytest.raises(Stop):
        train.train_and_evaluate(penguins_config(), str(tmp_path))
    assert seen[0]["shard_index"] == 1 and seen[0]["shard_count"] == 2
    assert seen[0]["batch_size"] == 16  # global batch 32 over 2 processes


def test_only_process_0_writes_summaries(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = train.create_writer(str(tmp_path / "p1"))
    writer.write_scalars(1, {"x": 1.0})
    writer.flush()
    writer.close()
    assert not glob.glob(str(tmp_path / "p1" / "*tfevents*"))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    writer = train.create_writer(str(tmp_path / "p0"))
    writer.write_scalars(1, {"x": 1.0})
    writer.flush()
    writer.close()
    assert len(glob.glob(str(tmp_path / "p0" / "*tfevents*"))) == 1


# -- two real processes (slow) -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _main_cmd(workdir: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mtl_jax.main", "--config=experiments/penguins.py:smoke",
        f"--workdir={workdir}", "--config.optimizer=sgd", "--config.learning_rate=0.05",
        "--config.balancer=mgda", "--config.eval_batch_size=8", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_two_processes_match_one_and_only_process_0_writes(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    single = str(tmp_path / "single")
    proc = subprocess.run(
        _main_cmd(single, "--config.num_devices=1"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = str(tmp_path / "multi")
    env.update(
        JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        MTL_JAX_NUM_PROCESSES="2",
    )
    cmd = _main_cmd(multi, "--config.distributed=True", "--config.mesh=(('data', 8),)")
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(env, MTL_JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "process 1 of 2, 4 local / 8 global devices" in outs[1][1]
    assert "test metrics" in outs[0][0] and "test metrics" not in outs[1][0]
    with open(os.path.join(single, "results.json")) as f:
        ref = json.load(f)
    with open(os.path.join(multi, "results.json")) as f:
        res = json.load(f)
    assert res["steps"] == ref["steps"] == 4
    for key, value in ref["final"].items():
        assert res["final"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert len(glob.glob(os.path.join(multi, "*tfevents*"))) == 1
