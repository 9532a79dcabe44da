"""Run an experiment on a Cloud TPU VM or pod slice: create, install, copy data, run, tear down.

Every step is a ``gcloud`` command (https://cloud.google.com/tpu/docs/jax-pods); ``--dry-run``
prints them, exactly, without running anything::

    python -m launch.tpu all --dry-run --project=my-project --zone=us-west4-a \\
        --name=mtl-v5e --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite \\
        --config=experiments/nyud.py --workdir=/mnt/shared/runs/nyud_upgrad \\
        --data-src=gs://my-bucket/nyuv2 -- --config.balancer=upgrad

Steps (``all`` runs them in this order; each can be run alone):

* ``create``: ``gcloud compute tpus tpu-vm create`` (``--queued``: a queued resource, then
  polled until ACTIVE, the way Google recommends getting capacity).
* ``setup``: packs this checkout (``git archive HEAD``), copies it to every worker
  (``tpu-vm scp --worker=all``) and installs it with ``jax[tpu]`` there.
* ``data``: ``gcloud storage rsync`` of ``--data-src`` (a GCS prefix) into ``--data-dir`` on
  every worker (each host reads its own shard of every batch; skipped without ``--data-src``,
  e.g. for the embedded datasets).
* ``run``: ``python -m mtl_jax.main`` on all workers at once with ``MTL_JAX_DISTRIBUTED=1``
  (`jax.distributed.initialize()`); the output of every worker streams to this terminal and
  is kept in ``~/mtl_jax_<name>.log`` on each worker. Arguments after ``--`` go to
  ``mtl_jax.main``. On a pod slice ``--workdir`` must be a directory all workers share (an
  NFS or gcsfuse mount): orbax writes each host's part of the checkpoint there.
* ``delete``: deletes the TPU VM (or the queued resource and its VM).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time

STEPS = ("create", "setup", "data", "run", "delete")
ARCHIVE = "mtl_jax.tar.gz"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to run: the TPU and the experiment."""

    project: str
    zone: str
    name: str
    accelerator_type: str = "v5litepod-16"
    runtime_version: str = "v2-alpha-tpuv5-lite"
    queued: bool = False
    spot: bool = False
    config: str = "experiments/multidigits.py"
    workdir: str = "/tmp/mtl_jax_work"
    data_src: str = ""
    data_dir: str = "/tmp/mtl_jax_data"
    overrides: tuple[str, ...] = ()

    def scope(self) -> list[str]:
        return [f"--project={self.project}", f"--zone={self.zone}"]

    def ssh(self, command: str) -> list[str]:
        """``command`` (a shell string) on every worker of the TPU, at the same time."""
        return [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            self.name,
            *self.scope(),
            "--worker=all",
            f"--command={command}",
        ]


def create_commands(t: Target) -> list[list[str]]:
    if t.queued:
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            t.name,
            *t.scope(),
            f"--node-id={t.name}",
            f"--accelerator-type={t.accelerator_type}",
            f"--runtime-version={t.runtime_version}",
        ]
    else:
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            t.name,
            *t.scope(),
            f"--accelerator-type={t.accelerator_type}",
            f"--version={t.runtime_version}",
        ]
    if t.spot:
        cmd.append("--spot")
    return [cmd]


def wait_command(t: Target) -> list[str]:
    """The state of the queued resource (polled until ACTIVE)."""
    return [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        t.name,
        *t.scope(),
        "--format=value(state.state)",
    ]


def setup_commands(t: Target) -> list[list[str]]:
    local = f"/tmp/{t.name}-{ARCHIVE}"
    install = (
        f"rm -rf ~/mtl_jax && mkdir -p ~/mtl_jax && tar -xzf ~/{ARCHIVE} -C ~/mtl_jax && "
        "cd ~/mtl_jax && python3 -m pip install -U 'jax[tpu]' -e '.[data]'"
    )
    return [
        ["git", "archive", "--format=tar.gz", f"--output={local}", "HEAD"],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            local,
            f"{t.name}:~/{ARCHIVE}",
            *t.scope(),
            "--worker=all",
        ],
        t.ssh(install),
    ]


def data_commands(t: Target) -> list[list[str]]:
    if not t.data_src:
        return []
    src, dst = shlex.quote(t.data_src), shlex.quote(t.data_dir)
    return [t.ssh(f"mkdir -p {dst} && gcloud storage rsync --recursive {src} {dst}")]


def run_commands(t: Target) -> list[list[str]]:
    args = [f"--config={t.config}", f"--workdir={t.workdir}"]
    if t.data_src:
        args.append(f"--config.data_dir={t.data_dir}")
    args += list(t.overrides)
    return [
        t.ssh(
            f"set -o pipefail; cd ~/mtl_jax && MTL_JAX_DISTRIBUTED=1 python3 -m mtl_jax.main "
            f"{shlex.join(args)} 2>&1 | tee ~/mtl_jax_{t.name}.log"
        )
    ]


def delete_commands(t: Target) -> list[list[str]]:
    if t.queued:
        return [
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "delete",
                t.name,
                *t.scope(),
                "--force",
                "--quiet",
            ]
        ]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name, *t.scope(), "--quiet"]]


def commands(t: Target, step: str) -> list[list[str]]:
    """The commands of one step (``create`` of a queued resource: without the polling)."""
    builders = {
        "create": create_commands,
        "setup": setup_commands,
        "data": data_commands,
        "run": run_commands,
        "delete": delete_commands,
    }
    return builders[step](t)


def plan(t: Target, steps: list[str]) -> list[str]:
    """The exact command lines of ``steps``, as ``--dry-run`` prints them."""
    lines = []
    for step in steps:
        lines.append(f"# {step}")
        lines += [shlex.join(cmd) for cmd in commands(t, step)]
        if step == "create" and t.queued:
            lines.append(f"{shlex.join(wait_command(t))}  # repeated until ACTIVE")
    return lines


def _wait_until_active(t: Target, poll_s: float = 30.0) -> None:
    while True:
        state = subprocess.run(
            wait_command(t), check=True, capture_output=True, text=True
        ).stdout.strip()
        print(f"queued resource {t.name}: {state}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise RuntimeError(f"Queued resource {t.name} is {state}; see `gcloud ... describe`.")
        time.sleep(poll_s)


def execute(t: Target, steps: list[str]) -> None:
    """Runs the steps; output streams to this terminal. ``all`` deletes the TPU even if the
    run fails."""
    try:
        for step in steps:
            if step == "delete":
                continue
            for cmd in commands(t, step):
                print(f"$ {shlex.join(cmd)}", flush=True)
                subprocess.run(cmd, check=True)
            if step == "create" and t.queued:
                _wait_until_active(t)
    finally:
        if "delete" in steps:
            for cmd in delete_commands(t):
                print(f"$ {shlex.join(cmd)}", flush=True)
                subprocess.run(cmd, check=False)


def parse_args(argv: list[str]) -> tuple[Target, list[str], bool]:
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0])
    p.add_argument("step", choices=(*STEPS, "all"), help="what to do ('all': every step)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--project", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    defaults = Target(project="", zone="", name="")
    for field in (
        "accelerator_type",
        "runtime_version",
        "config",
        "workdir",
        "data_src",
        "data_dir",
    ):
        flag = "--" + field.replace("_", "-")
        p.add_argument(flag, default=getattr(defaults, field), help="default: %(default)r")
    p.add_argument("--queued", action="store_true", help="create through a queued resource")
    p.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity")
    a = p.parse_args(argv)
    target = Target(
        project=a.project,
        zone=a.zone,
        name=a.name,
        accelerator_type=a.accelerator_type,
        runtime_version=a.runtime_version,
        queued=a.queued,
        spot=a.spot,
        config=a.config,
        workdir=a.workdir,
        data_src=a.data_src,
        data_dir=a.data_dir,
        overrides=tuple(overrides),
    )
    steps = list(STEPS) if a.step == "all" else [a.step]
    return target, steps, a.dry_run


def main(argv: list[str] | None = None) -> None:
    target, steps, dry_run = parse_args(sys.argv[1:] if argv is None else argv)
    if dry_run:
        print("\n".join(plan(target, steps)))
    else:
        execute(target, steps)


if __name__ == "__main__":
    main()
