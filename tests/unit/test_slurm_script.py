"""scripts/slurm/train.sbatch, run with stand-ins for ``srun`` (runs its command once per node with
that node's SLURM_NODEID), ``scontrol`` (names the nodes) and python (records its arguments): each
node gets the same ``accelerate launch`` with its own machine rank, node 0 as the rendezvous host
and the total process count; the launch arguments parse with accelerate's own parser."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"

SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
"""
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-a17\\ngpu-a18\\n'
"""
PY = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$OUT_DIR/node$SLURM_NODEID.args"
echo "$OMP_NUM_THREADS" > "$OUT_DIR/node$SLURM_NODEID.omp"
"""


def _stub(d: Path, name: str, text: str) -> None:
    (d / name).write_text(text)
    (d / name).chmod(0o755)


def _run(tmp_path, *args, **env):
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    _stub(bin_, "srun", SRUN)
    _stub(bin_, "scontrol", SCONTROL)
    _stub(bin_, "fakepy", PY)
    full = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OUT_DIR": str(tmp_path), "PY": str(bin_ / "fakepy"),
            "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(ROOT),
            "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", **env}
    full.pop("OMP_NUM_THREADS", None)
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=60)


def test_each_node_launches_accelerate_with_its_rank(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)   # the config path is relative to the repository, as in the job
    r = _run(tmp_path, "dpo", "recipes/llava/dpo.yaml", "train.output_dir=/shared/run")
    assert r.returncode == 0, r.stderr
    assert "2 nodes x 4 processes, rendezvous gpu-a17:29500" in r.stdout
    for rank in (0, 1):
        argv = (tmp_path / f"node{rank}.args").read_text().splitlines()
        assert argv[:2] == ["-m", "accelerate.commands.launch"]
        launch = argv[2:]
        assert launch[launch.index("-m") + 1:] == ["vlmalign", "train", "dpo", "--config", "recipes/llava/dpo.yaml",
                                                   "train.output_dir=/shared/run"]
        args = launch_command_parser().parse_args(launch)
        _validate_launch_command(args)
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 8, rank)
        assert (args.main_process_ip, args.main_process_port) == ("gpu-a17", 29500)
        assert args.config_file == "configs/accelerate/multinode.yaml" and args.multi_gpu
        assert (tmp_path / f"node{rank}.omp").read_text().strip() == "8"   # 32 CPUs / 4 processes


def test_another_config_and_port(tmp_path):
    r = _run(tmp_path, "sft", "r.yaml", ACCEL_CONFIG="configs/accelerate/zero3.yaml", MAIN_PORT="29777")
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "node1.args").read_text().splitlines()
    assert argv[argv.index("--config_file") + 1] == "configs/accelerate/zero3.yaml"
    assert argv[argv.index("--main_process_port") + 1] == "29777"


@pytest.mark.parametrize("args,env,message", [
    ((), {}, "usage: sbatch scripts/slurm/train.sbatch METHOD RECIPE"),
    (("sft", "r.yaml"), {"SLURM_JOB_NODELIST": ""}, "not inside a SLURM allocation"),
])
def test_refusals(tmp_path, args, env, message):
    r = _run(tmp_path, *args, **env)
    assert r.returncode != 0 and message in r.stderr
