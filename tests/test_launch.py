"""Launching the real `stagecraft` command: user config trees, concurrent local jobs, several "nodes" on
loopback, the shared-run.dir check, and slurm through fake `sbatch` / `srun` / `scontrol` scripts that
record every call and run the job here (docs/launch.md).

Budget: every run is a tiny SFT of 3 steps; the multi-process runs are the 2 concurrent local jobs,
one 2-node x 2-process slurm job and one 2-node x 1-process failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY, assert_series_close, free_port, losses, stagecraft_command, train_records
from trainer.config.validate import ConfigError
from trainer.launch.multinode import Rendezvous, expand_nodelist, from_slurm, validate_cluster
from trainer.runtime.errors import BadInput

pytestmark = pytest.mark.distributed
QUICK = ["stage.max_steps=3", "stage.micro_batch_size=2", "stage.eval_max_new_tokens=0"]
JOB_ID = 4242


def _log(proc) -> str:
    return proc.stdout + proc.stderr


# --- rendezvous from the scheduler's environment, and the cluster.* rules ---------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("node07", ["node07"]),
    ("node[01-03],other", ["node01", "node02", "node03", "other"]),
    ("gpu[1,3-4]-ib,cpu9", ["gpu1-ib", "gpu3-ib", "gpu4-ib", "cpu9"]),
    ("rack[1-2]-n[8-9]", ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]),
    ("a[098-101]", ["a098", "a099", "a100", "a101"]),
])
def test_slurm_nodelists_expand_in_order(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def _cluster(**keys):
    base = {"launcher": "srun", "nproc_per_node": 8, "nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1",
            "master_port": 0, "signal": "USR1@300", "sbatch_lines": [], "srun_args": []}
    return OmegaConf.create({**base, **keys})


def test_an_srun_task_takes_its_place_from_the_scheduler():
    env = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_NTASKS": "3", "SLURM_JOB_ID": "1234567",
           "SLURM_JOB_NODELIST": "gpu-[017-019]"}
    # The port is the same on every node of a job and differs between jobs: 20000 + job id % 10000.
    assert from_slurm(_cluster(), env) == Rendezvous(3, 2, "gpu-017", 24567)
    assert from_slurm(_cluster(master_port=29500, nnodes=3), env).master_port == 29500


@pytest.mark.parametrize("env, cluster, message", [
    ({}, {}, "cluster.launcher=srun: SLURM_NNODES is not set"),
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n[1-2]"}, {},
     "this step runs 16 tasks on 2 nodes; it needs one task per node"),
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "1"}, {"nnodes": 4},
     "cluster.nnodes: 4, but the slurm allocation has SLURM_NNODES=2"),
])
def test_an_srun_task_outside_a_proper_step_is_refused(env, cluster, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        from_slurm(_cluster(**cluster), env)


@pytest.mark.parametrize("keys, message", [
    ({"launcher": "pbs"}, "cluster.launcher: must be one of local, slurm, srun; got 'pbs'"),
    ({"launcher": "local", "nnodes": 2, "node_rank": 2, "master_port": 29500},
     "cluster.node_rank: must be in [0, cluster.nnodes=2); got 2"),
    ({"launcher": "local", "nnodes": 2}, "cluster.master_port: a run on cluster.nnodes=2 nodes needs a fixed port"),
    ({"launcher": "slurm", "signal": "USR1"}, "cluster.signal: must be SIGNAL@SECONDS, e.g. USR1@300; got 'USR1'"),
    ({"launcher": "slurm", "signal": "USR2@120"}, "cluster.signal: SIGUSR2 is not in run.stop_signals"),
])
def test_cluster_rules_name_the_key(keys, message):
    cfg = OmegaConf.create({"cluster": _cluster(**keys), "run": {"stop_signals": ["SIGTERM", "SIGUSR1"]}})
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_cluster(cfg)


# --- local: the user's own config tree reaches the workers; two jobs at once -------------------------

def _user_configs(root: Path) -> list[str]:
    """A primary config, a stage config and (on hydra.searchpath) a data config, none in the project."""
    (root / "conf/stage").mkdir(parents=True)
    (root / "extra/data").mkdir(parents=True)
    (root / "conf/mine.yaml").write_text("defaults:\n  - config\n  - override stage: mine\n  - override data: mine\n"
                                         "  - _self_\n")
    (root / "conf/stage/mine.yaml").write_text("defaults:\n  - sft\nname: mine\n")
    (root / "extra/data/mine.yaml").write_text("defaults:\n  - synthetic\n")
    return ["--config-dir", str(root / "conf"), "--config-name", "mine", f"hydra.searchpath=[file://{root / 'extra'}]"]


@pytest.fixture(scope="module")
def local_pair(tmp_path_factory, cache_dir):
    """Two 2-process jobs started together on this machine: one composed from the user's own config
    tree (--config-dir, --config-name, hydra.searchpath), one from the project's."""
    root = tmp_path_factory.mktemp("local")
    user = _user_configs(root)
    runs = {"user": root / "user", "plain": root / "plain"}
    procs = {}
    for name, run in runs.items():
        cmd, env = stagecraft_command(run, [*(user if name == "user" else []), *QUICK, "parallel=zero2"],
                                      cache_dir, nproc=2)
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}\n{err[-5000:]}"
        logs[name] = out + err
    return runs, logs


def test_a_user_config_tree_reaches_the_workers_and_two_local_jobs_run_at_once(local_pair):
    runs, logs = local_pair
    # Composed in the workers from the user's tree: the stage is named by the user's stage config.
    assert [r["step"] for r in train_records(runs["user"], "mine")] == [1, 2, 3]
    assert not (runs["user"] / "stages/sft").exists()
    assert_series_close(losses(runs["user"], "mine"), losses(runs["plain"]), tol=0)  # the same training
    ports = {name: re.search(r"--master_port=(\d+)", log).group(1) for name, log in logs.items()}
    assert ports["user"] != ports["plain"]  # each job picked its own free port
    launched = re.search(r"launching: (.*)", logs["user"]).group(1)
    assert f"--config-dir {runs['user'].parent / 'conf'} --config-name mine hydra.searchpath=" in launched


# --- several nodes on loopback -----------------------------------------------------------------------

def test_nodes_that_do_not_share_run_dir_stop_with_an_error_naming_it(tmp_path, cache_dir):
    """Two "nodes" (config: node_rank 0 and 1, one fixed port) given different run.dirs, as if run.dir
    were on node-local disks: both stop after rendezvous with exit 2 and one message naming both."""
    port = free_port()
    procs = []
    for rank, run in enumerate([tmp_path / "node0", tmp_path / "node1"]):
        cmd, env = stagecraft_command(run, [*QUICK, "cluster.nnodes=2", f"cluster.node_rank={rank}",
                                            f"cluster.master_port={port}"], cache_dir, nproc=1)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ended = [(p, "".join(p.communicate(timeout=600))) for p in procs]
    message = (f"run.dir: not the same directory on every rank. Rank 0 on {os.uname().nodename} wrote "
               f"{tmp_path / 'node0'}/.shared-fs-")
    for proc, log in ended:
        assert proc.returncode == 2, log[-3000:]
        assert message in log and f"rank 1 on {os.uname().nodename} looked in {tmp_path / 'node1'}" in log
    assert json.loads((tmp_path / "node0/exit.json").read_text())["error"] == "BadInput"
    assert not list((tmp_path / "node0").glob(".shared-fs-*"))  # the probe is removed
    assert not (tmp_path / "node1/.lock").exists()  # only node 0's launcher locks run.dir


# --- slurm --------------------------------------------------------------------------------------------

FAKE_SBATCH = r"""#!/bin/bash
# Records the call, prints the job id (--parsable) and runs the job here and now, each array task in
# turn, with the variables slurm sets; the job's output goes where its --output line says.
echo "sbatch $*" >> "$FAKE_SLURM/calls"
script="${@: -1}"
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
last=$(sed -n 's/^#SBATCH --array=0-//p' "$script")
output=$(sed -n 's/^#SBATCH --output=//p' "$script")
echo "$FAKE_JOB_ID"
for task in $(seq 0 "${last:-0}"); do
  id=$((FAKE_JOB_ID + task)); out=${output//%j/$id}; out=${out//%A/$FAKE_JOB_ID}; out=${out//%a/$task}
  array=(); [ -n "$last" ] && array=(SLURM_ARRAY_JOB_ID=$FAKE_JOB_ID SLURM_ARRAY_TASK_ID=$task)
  env SLURM_JOB_ID=$id "${array[@]}" SLURM_NNODES=$nodes SLURM_JOB_NUM_NODES=$nodes SLURM_NTASKS=$nodes \
      SLURM_JOB_NODELIST="127.0.0.[1-$nodes]" bash "$script" >> "$out" 2>&1
  echo "task $task exit $?" >> "$FAKE_SLURM/calls"
done
"""
FAKE_SRUN = r"""#!/bin/bash
# One task per node of the allocation, all on this machine, each with its SLURM_NODEID.
echo "srun $*" >> "$FAKE_SLURM/calls"
while [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_STEP_ID=0 "$@" &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid"; c=$?; [ "$c" -gt "$code" ] && code=$c; done
exit "$code"
"""
FAKE_SCONTROL = '#!/bin/bash\necho "scontrol $*" >> "$FAKE_SLURM/calls"\n'


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin/ of fake slurm tools and the file their calls are recorded in."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM": str(bin_dir), "FAKE_JOB_ID": str(JOB_ID)}
    return env, bin_dir / "calls"


def _calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_the_sbatch_script_of_a_two_node_job(tmp_path, cache_dir):
    run = tmp_path / "run"
    user = _user_configs(tmp_path)
    cmd, env = stagecraft_command(run, [*user, "cluster=slurm", "cluster.nnodes=2", "cluster.nproc_per_node=4",
                                        "cluster.partition=gpu", "cluster.account=proj7", "cluster.time=02:00:00",
                                        "cluster.cpus_per_task=32", "cluster.signal=USR1@240",
                                        "cluster.sbatch_lines=['--qos=high','--exclusive']",
                                        "cluster.setup=[module load cuda/12.4,source /opt/venv/bin/activate]",
                                        "cluster.srun_args=['--container-image=/img/train.sqsh']",
                                        "stage.global_batch_size=64", "cluster.dry_run=true"], cache_dir)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _log(proc)[-3000:]
    script = run / "slurm/job.sbatch"
    assert proc.stdout == script.read_text()
    lines = script.read_text().splitlines()
    assert lines[:16] == [
        "#!/bin/bash",
        "# Written by stagecraft (trainer/launch/slurm.py); docs/launch.md explains each part.",
        "#SBATCH --job-name=sft-demo", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32", "#SBATCH --time=02:00:00",
        "#SBATCH --partition=gpu", "#SBATCH --account=proj7", f"#SBATCH --output={run}/slurm/%j.out",
        "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@240", "#SBATCH --requeue",
        "#SBATCH --qos=high", "#SBATCH --exclusive"]
    body = lines[16:]
    assert body[:4] == ["", "# cluster.setup", "module load cuda/12.4", "source /opt/venv/bin/activate"]
    assert f"run_dir={run}" in body
    args = next(line for line in body if line.startswith("args=("))
    # The user's config tree and overrides, this run.dir, and no dry run inside the job.
    assert args.startswith(f"args=(--config-dir {tmp_path / 'conf'} --config-name mine "
                           f"'hydra.searchpath=[file://{tmp_path / 'extra'}]' ")
    assert args.endswith(f" run.dir={run} hydra.output_subdir=null)") and "dry_run" not in args
    srun = (f"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --container-image=/img/train.sqsh "
            f"{sys.executable} -m trainer.cli \"${{args[@]}}\" cluster.launcher=srun &")
    for expected in ['rm -f "$run_dir/exit.json"  # from an earlier attempt: it must not decide about this one',
                     "trap 'got_signal=1' TERM", "trap 'got_signal=1; kill -s USR1 \"$pid\" 2>/dev/null' USR1", srun,
                     '  [ "$got_signal" -eq 1 ] || break', 'if [ "$code" -eq 75 ]; then',
                     '  scontrol requeue "$SLURM_JOB_ID"', 'exit "$code"']:
        assert expected in body, expected
    assert body.index(srun) < body.index('if [ "$code" -eq 75 ]; then')
    example = Path(__file__).parents[1] / "launch/slurm/own_allocation.sbatch"
    for path in (script, example):
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, path


def test_a_slurm_job_on_two_nodes_trains_like_local_processes(local_pair, tmp_path, cache_dir, fake_slurm):
    """sbatch -> the script -> one srun task per "node" (SLURM_NODEID 0 and 1) -> torchrun with 2
    workers each, meeting over loopback: a world of 4 training the losses of the local 2-process runs
    (dp 4 x 1 micro-batch and dp 2 x 2 micro-batches of 2 are the same global batch)."""
    slurm_env, calls = fake_slurm
    run = tmp_path / "run"
    cmd, env = stagecraft_command(run, [*QUICK, "parallel=zero2", "cluster=slurm", "cluster.nnodes=2",
                                        "cluster.nproc_per_node=2", "parallel.device=cpu",
                                        f"cluster.master_port={free_port()}"], cache_dir, env=slurm_env)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _log(proc)[-3000:]
    assert f"submitted slurm job {JOB_ID} (2 node(s) x 2 workers)" in proc.stdout
    recorded = _calls(calls)
    assert recorded[0] == f"sbatch --parsable {run}/slurm/job.sbatch"
    assert recorded[1].startswith(f"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 {sys.executable} -m "
                                  "trainer.cli ") and recorded[1].endswith(" cluster.launcher=srun")
    assert recorded[2:] == ["task 0 exit 0"]  # no requeue
    job_log = (run / f"slurm/{JOB_ID}.out").read_text()
    assert f"stagecraft: job {JOB_ID} ended with exit code 0" in job_log
    assert "node 0 of 2" in job_log and "node 1 of 2" in job_log and "--master_addr=127.0.0.1" in job_log
    assert "shared by all 4 ranks" in job_log
    ckpt = next((run / "stages/sft/checkpoints").glob("step_*"))
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == [f"rng_rank{r}.pt" for r in range(4)]
    runs, _ = local_pair
    assert_series_close(losses(run), losses(runs["plain"]))


FAKE_RUN = r"""#!/bin/bash
# Stands in for stagecraft on each node: node 0 records the code $FAKE_CODE in exit.json as rank 0 does,
# and every node exits 1, as a node launcher whose torchrun lost a worker may.
for arg in "$@"; do case "$arg" in run.dir=*) run_dir=${arg#run.dir=} ;; esac; done
[ "$SLURM_NODEID" = 0 ] && printf '{"code": %s, "error": "Fake", "message": "fake"}' "$FAKE_CODE" > "$run_dir/exit.json"
exit 1
"""


@pytest.mark.parametrize("code, requeued", [(75, True), (2, False)])
def test_a_preempted_job_requeues_itself_and_a_failed_one_does_not(tmp_path, cache_dir, fake_slurm, code, requeued):
    slurm_env, calls = fake_slurm
    fake = tmp_path / "fake-run.sh"
    fake.write_text(FAKE_RUN)
    fake.chmod(0o755)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "exit.json").write_text('{"code": 75, "error": "Preempted", "message": "an earlier attempt"}')
    cmd, env = stagecraft_command(run, ["cluster=slurm", "cluster.nnodes=2", "cluster.nproc_per_node=1",
                                        "parallel.device=cpu", f"cluster.command={fake}"], cache_dir,
                                  env={**slurm_env, "FAKE_CODE": str(code)})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _log(proc)[-3000:]
    recorded = _calls(calls)
    assert recorded[1].startswith(f"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 {fake} ")
    assert recorded[2:] == ([f"scontrol requeue {JOB_ID}", "task 0 exit 75"] if requeued else ["task 0 exit 2"])
    job_log = (run / f"slurm/{JOB_ID}.out").read_text()
    assert f"ended with exit code {code}" in job_log
    assert ("requeueing job" in job_log) == requeued


def test_a_sweep_is_one_job_array_with_a_run_dir_per_point_and_a_summary(tmp_path, cache_dir, fake_slurm):
    """`-m data.max_length=64,8` on slurm: one array of 2 tasks; each point in its own default run.dir
    (run_id differs); the point whose data no longer fits fails (exit 1) and the table says so."""
    slurm_env, calls = fake_slurm
    tiny = [o for o in TINY if not o.startswith("data.max_length=")]
    cmd = [sys.executable, "-m", "trainer.cli", "-m", *tiny, *QUICK, "cluster=slurm", "parallel.device=cpu",
           "cluster.nproc_per_node=1", "data.max_length=64,8"]
    env = {**os.environ, **slurm_env, "STAGECRAFT_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _log(proc)[-3000:]
    sweeps = list((tmp_path / "runs").glob("sweep-*"))
    assert len(sweeps) == 1 and re.fullmatch(r"sweep-[0-9a-f]{8}", sweeps[0].name)
    sweep = sweeps[0]
    assert _calls(calls)[0] == f"sbatch --parsable {sweep}/slurm/job.sbatch"
    assert [c for c in _calls(calls) if c.startswith("task")] == ["task 0 exit 0", "task 1 exit 1"]
    assert "#SBATCH --array=0-1" in (sweep / "slurm/job.sbatch").read_text()
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["varying"] == ["data.max_length"] and manifest["job_id"] == str(JOB_ID)
    dirs = [Path(p["run_dir"]) for p in manifest["points"]]
    assert dirs[0] != dirs[1] and all(re.fullmatch(r"sft-demo-[0-9a-f]{8}", d.name) for d in dirs)
    assert all(d.parent == tmp_path / "runs" for d in dirs)

    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0] == f"# Sweep {sweep.name}"
    done = json.loads((dirs[0] / "stages/sft/COMPLETE.json").read_text())
    metrics = {"loss": losses(dirs[0])[-1],
               **{k: v for k, v in done.items() if isinstance(v, (int, float)) and k != "steps"}}
    assert "eval_loss" in metrics
    assert table[2] == f"| # | data.max_length | exit | {' | '.join(metrics)} | run.dir |"
    cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in metrics.values()]
    assert table[4] == f"| 0 | 64 | 0 | {' | '.join(cells)} | {dirs[0]} |"
    assert table[5] == f"| 1 | 8 | 1 (ValueError) | {' | '.join([''] * len(metrics))} | {dirs[1]} |"
    again = subprocess.run([sys.executable, "-m", "trainer.cli", "sweep", str(sweep)], capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.splitlines() == table


def test_sweep_points_that_would_share_a_run_dir_are_refused_before_anything_is_queued(tmp_path, cache_dir,
                                                                                         fake_slurm):
    """run_id ignores logging.* (and cluster.*): two points differing only there would train into one
    directory."""
    slurm_env, calls = fake_slurm
    cmd = [sys.executable, "-m", "trainer.cli", "-m", *TINY, "cluster=slurm", "parallel.device=cpu",
           "cluster.nproc_per_node=1", "logging.log_every=1,2"]
    env = {**os.environ, **slurm_env, "STAGECRAFT_CACHE": str(cache_dir)}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "run.dir: sweep points 0 (logging.log_every=1) and 1 (logging.log_every=2) both resolve to" in _log(proc)
    assert "set run.name per point" in _log(proc)
    assert _calls(calls) == []


def test_a_local_sweep_runs_each_point_in_its_own_run_dir_and_ends_with_the_table(tmp_path, cache_dir):
    """Without slurm the points run one after another in this process; the second must still be
    validated as a launcher would (the first one's in-process worker set LOCAL_RANK)."""
    cmd = [sys.executable, "-m", "trainer.cli", "-m", *TINY, *QUICK, "stage.optim.lr=1e-3,3e-3"]
    env = {**os.environ, "STAGECRAFT_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _log(proc)[-3000:]
    (sweep,) = (tmp_path / "runs").glob("sweep-*")
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    rows = (sweep / "summary.md").read_text().splitlines()[4:]
    assert len(points) == len(rows) == 2
    for point, row, lr in zip(points, rows, ["0.001", "0.003"]):
        run_dir = Path(point["run_dir"])
        assert row.startswith(f"| {rows.index(row)} | {lr} | 0 | {losses(run_dir)[-1]:.4g} | ")
        assert row.endswith(f" | {run_dir} |") and len(losses(run_dir)) == 3
    assert losses(Path(points[0]["run_dir"])) != losses(Path(points[1]["run_dir"]))
    assert "\n".join(rows) in proc.stdout  # printed at the end


def test_a_run_dir_held_by_a_live_job_is_refused_at_submission(tmp_path, cache_dir, fake_slurm):
    """Refused before anything is queued (exit 4), and the live job's exit.json is not written: its
    batch script reads that file when the job ends."""
    from trainer.runtime.lock import RunLock

    slurm_env, calls = fake_slurm
    run = tmp_path / "run"
    cmd, env = stagecraft_command(run, ["cluster=slurm", "cluster.nproc_per_node=1", "parallel.device=cpu"],
                                  cache_dir, env=slurm_env)
    with RunLock(run):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4 and f"run.dir {run} is in use by pid {os.getpid()}" in _log(proc)
    assert _calls(calls) == [] and not (run / "exit.json").exists()
