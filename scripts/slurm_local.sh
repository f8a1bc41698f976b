#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian's slurm-wlm 22.05 + munge), and a DeNS
# training job submitted to it through submitit.
#
#   scripts/slurm_local.sh start        start munged (as the munge user), slurmctld, slurmd
#   scripts/slurm_local.sh submit-test  generate tiny data, submit a 2-rank CPU DeNS training with
#                                       `python -m fairchem_dens.launch --slurm`, wait, check the
#                                       checkpoint and the log; then submit the same config with the
#                                       stock `fairchem --submit --cpu` and show how it fails
#   scripts/slurm_local.sh stop         stop the daemons this script started (by PID)
#   scripts/slurm_local.sh all          start, submit-test, stop (stops even on failure)
#   scripts/slurm_local.sh status       sinfo / squeue
#
# Needs root and the packages: apt-get install -y slurmctld slurmd slurm-client munge
# Everything (config, state, logs, munge socket and key) lives in $SLURM_LOCAL_DIR
# (default /tmp/fairchem-dens-slurm); client commands need `export SLURM_CONF=$DIR/etc/slurm.conf`.
# Ports 16817/16818 (SLURM_LOCAL_PORT / +1) so that a system SLURM on 6817/6818 is left alone.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${SLURM_LOCAL_DIR:-/tmp/fairchem-dens-slurm}
PORT=${SLURM_LOCAL_PORT:-16817}
PY=${PY:-$ROOT/.venv/bin/python}
FAIRCHEM=${FAIRCHEM:-$(dirname "$PY")/fairchem}
CONF=$DIR/etc/slurm.conf
MUNGE=$DIR/munge
export SLURM_CONF=$CONF

log() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

require() {
    [ "$(id -u)" = 0 ] || die "must run as root (munged runs as the munge user, slurmd as root)"
    local missing=()
    for bin in slurmctld slurmd sbatch sinfo scontrol munged; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    [ ${#missing[@]} = 0 ] || die "not installed: ${missing[*]}; run: apt-get update && apt-get install -y slurmctld slurmd slurm-client munge"
    id munge >/dev/null 2>&1 || die "no munge user (install the munge package)"
}

write_config() {
    local node cpus mem
    node=$(hostname -s)
    # the node's real CPUs and memory, as slurmd detects them
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    cat > "$CONF" <<EOF
# one-node cluster written by scripts/slurm_local.sh
ClusterName=fairchem-dens
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
# fairchem's --submit always asks for GPUs: declare a gres (gres.conf points it at /dev/null)
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/etc/gres.conf" <<EOF
NodeName=$node Name=gpu File=/dev/null
EOF
    log "wrote $CONF (node $node: CPUs=$cpus RealMemory=${mem}MB, gres gpu:1 -> /dev/null)"
}

start_munge() {
    alive "$MUNGE/munged.pid" && { log "munged already running (pid $(cat "$MUNGE/munged.pid"))"; return; }
    mkdir -p "$MUNGE"
    runuser -u munge -- test -x "$DIR" \
        || die "the munge user cannot reach $DIR (a parent directory is not world-searchable); set SLURM_LOCAL_DIR to a directory under /tmp"
    chown munge:munge "$MUNGE"
    chmod 0755 "$MUNGE"
    if [ ! -s "$MUNGE/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE/munge.key"
    chmod 0400 "$MUNGE/munge.key"
    runuser -u munge -- munged --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" \
        --seed-file="$MUNGE/munged.seed" \
        || die "munged failed to start; see $MUNGE/munged.log"
    for _ in $(seq 50); do alive "$MUNGE/munged.pid" && [ -S "$MUNGE/munge.socket" ] && break; sleep 0.1; done
    alive "$MUNGE/munged.pid" || die "munged did not start; see $MUNGE/munged.log"
    log "munged running as $(ps -o user= -p "$(cat "$MUNGE/munged.pid")") (pid $(cat "$MUNGE/munged.pid"))"
}

cmd_start() {
    require
    local t0
    t0=$(now)
    alive "$DIR/run/slurmctld.pid" && die "already running (pid $(cat "$DIR/run/slurmctld.pid")); run stop first"
    rm -rf "$DIR/state" "$DIR/spool"
    write_config
    start_munge
    slurmctld -f "$CONF" || die "slurmctld failed; see $DIR/log/slurmctld.log"
    slurmd -f "$CONF" || die "slurmd failed; see $DIR/log/slurmd.log"
    local state=""
    for _ in $(seq 300); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        [ "$state" = idle ] && break
        sleep 0.1
    done
    [ "$state" = idle ] || die "node not idle after 30 s (state '${state:-none}'); see $DIR/log/"
    log "cluster up in $(since "$t0") s: slurmctld pid $(cat "$DIR/run/slurmctld.pid"), slurmd pid $(cat "$DIR/run/slurmd.pid")"
    sinfo
}

cmd_status() {
    export SLURM_CONF=$CONF
    sinfo && squeue
}

# Tiny data and a tiny EquiformerV2 + DeNS config (16 structures, 2 ranks, 2 epochs = 4 steps).
prepare_run() {
    local work=$1
    mkdir -p "$work"
    if [ ! -f "$work/data/oc20/normalizers.yml" ]; then
        OMP_NUM_THREADS=1 "$PY" -m fairchem_dens.data --out "$work/data" --variant oc20 \
            --systems 4 --max-steps 12 --seed 0 > "$work/data.log" 2>&1 \
            || die "data generation failed; see $work/data.log"
    fi
    cat > "$work/config.yml" <<EOF
includes:
  - $work/data/oc20/normalizers.yml
trainer: fairchem_dens.trainer.DeNSTrainer
logger: tensorboard
outputs:
  energy: {shape: 1, level: system}
  forces: {irrep_dim: 1, level: atom, train_on_free_atoms: True, eval_on_free_atoms: True}
loss_functions:
  - energy: {fn: mae, coefficient: 2}
  - forces: {fn: l2mae, coefficient: 100}
dataset:
  train:
    format: fairchem_dens.datasets.DeNSLmdbDataset
    src: $work/data/oc20/train
    key_mapping: {y: energy, force: forces}
    first_n: 16
model:
  name: hydra
  pass_through_head_outputs: True
  otf_graph: True
  backbone:
    model: fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone
    use_force_encoding: True
    use_pbc: True
    otf_graph: True
    max_neighbors: 12
    max_radius: 5.0
    num_layers: 1
    sphere_channels: 8
    attn_hidden_channels: 8
    num_heads: 2
    attn_alpha_channels: 4
    attn_value_channels: 4
    ffn_hidden_channels: 8
    lmax_list: [2]
    mmax_list: [1]
    grid_resolution: 16
    num_sphere_samples: 16
    edge_channels: 8
    num_distance_basis: 16
  heads:
    energy: {module: equiformerV2_scalar_head}
    forces: {module: equiformerV2_vector_head}
    dens_noise: {module: fairchem_dens.heads.EqV2NoiseHead}
optim:
  batch_size: 4
  eval_batch_size: 8
  num_workers: 0
  max_epochs: 2
  checkpoint_every: 4
  optimizer: AdamW
  lr_initial: 0.0005
  scheduler: LambdaLR
  scheduler_params: {lambda_type: cosine, warmup_factor: 0.2, warmup_epochs: 0.5, lr_min_factor: 0.01}
  dens: {prob: 0.5, sigma_high: 0.5, coefficient: 10, schedule: linear, candidates: free}
EOF
}

cmd_submit_test() {
    require
    sinfo -h -o %T 2>/dev/null | grep -q . || die "no cluster answering at $CONF; run start first"
    local work=$DIR/test run logs t0 job ckpt
    prepare_run "$work"
    run=$work/run-$(date +%s)
    logs=$run/logs
    mkdir -p "$run"

    log "1/2 DeNS training, 2 CPU ranks (gloo) through submitit on SLURM: python -m fairchem_dens.launch --slurm"
    t0=$(now)
    OMP_NUM_THREADS=1 WANDB_MODE=offline "$PY" -m fairchem_dens.launch --mode train \
        --config-yml "$work/config.yml" --cpu --num-ranks 2 --slurm --slurm-mem 2 \
        --slurm-timeout 1 --run-dir "$run" --logdir "$logs" --identifier dens-slurm \
        --print-every 1 2>&1 | tee "$run/launch.log" | grep -E "submitted job|finished|FAILED|log:|error" \
        || true
    grep -q "finished: 2 ranks ok" "$run/launch.log" || die "the SLURM job failed; see $run/launch.log and $logs"
    job=$(sed -n 's/.*submitted job \([0-9]*\):.*/\1/p' "$run/launch.log" | head -1)
    log "job $job done in $(since "$t0") s (submit + queue + 2 ranks x 4 steps)"
    local state=""
    for _ in $(seq 60); do
        state=$(scontrol show job "$job" 2>/dev/null | grep -oE "JobState=[A-Z]+" || true)
        [ "$state" = JobState=RUNNING ] || [ "$state" = JobState=COMPLETING ] || break
        sleep 0.5
    done
    log "scontrol: $state $(scontrol show job "$job" 2>/dev/null | grep -oE "NumTasks=[0-9]+|TRES=[^ ]+" | tr '\n' ' ' || true)"
    [ "$state" = JobState=COMPLETED ] || die "job $job ended as $state"
    ckpt=$(ls "$run"/checkpoints/*/checkpoint.pt 2>/dev/null | head -1)
    [ -n "$ckpt" ] || die "no checkpoint.pt under $run/checkpoints"
    "$PY" - "$ckpt" "$job" <<'EOF' || die "checkpoint check failed"
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
assert state["step"] == 4, f"checkpoint step {state['step']} != 4"
assert any("dens_noise" in key for key in state["state_dict"]), "no noise head in checkpoint"
assert state["config"]["optim"]["dens"]["schedule"] == "linear"
slurm = state["config"]["slurm"]
assert slurm["ntasks_per_node"] == 2 and slurm["job_id"] == sys.argv[2], slurm
print(f"[slurm_local] checkpoint ok: {sys.argv[1]} (step {state['step']}, SLURM job {slurm['job_id']}, 2 tasks)")
EOF
    local rank0_log="$logs/$job/${job}_0_log.err"
    grep -q "loss_dens:" "$rank0_log" || rank0_log="$logs/$job/${job}_0_log.out"
    grep -q "loss_dens:" "$rank0_log" || die "no loss_dens lines in the rank-0 log $logs/$job/"
    grep -q "step: 4" "$rank0_log" || die "rank-0 log never reached step 4: $rank0_log"
    grep -q "rank: 1: Sampler created" "$logs/$job/${job}_1_log.err" "$logs/$job/${job}_1_log.out" 2>/dev/null \
        || die "rank 1 never built its sampler: $logs/$job/${job}_1_log.*"
    log "log ok: $rank0_log has loss_dens lines up to step 4; rank 1 ran"
    "$PY" -m fairchem_dens.launch --check "$logs" | sed 's/^/[slurm_local]   /'

    log "2/2 the stock CLI on the same config: fairchem --submit --cpu (expected to fail on CPU)"
    local stock=$work/stock-$(date +%s)
    mkdir -p "$stock"
    (cd "$stock" && OMP_NUM_THREADS=1 WANDB_MODE=offline "$FAIRCHEM" --mode train \
        --config-yml "$work/config.yml" --cpu --submit --num-gpus 1 --slurm-mem 2 \
        --slurm-timeout 1 --run-dir "$stock" --logdir "$stock/logs" --identifier dens-stock \
        > "$stock/submit.log" 2>&1) || die "stock fairchem --submit could not submit; see $stock/submit.log"
    job=$(sed -n 's/.*Submitted jobs: \([0-9]*\).*/\1/p' "$stock/submit.log" | head -1)
    [ -n "$job" ] || die "no job id in $stock/submit.log"
    for _ in $(seq 600); do
        [ -f "$stock/logs/$job/${job}_0_result.pkl" ] && break
        squeue -h -j "$job" 2>/dev/null | grep -q . || { sleep 1; break; }
        sleep 0.5
    done
    log "stock job $job, its sbatch script asks for: $(grep -oE -- '--(gpus-per-node|ntasks-per-node|cpus-per-task)=[0-9]+' "$stock/logs/$job/${job}_submission.sh" | tr '\n' ' ')"
    if "$PY" -m fairchem_dens.launch --check "$stock/logs" | sed 's/^/[slurm_local]   /'; then
        log "note: the stock --submit job succeeded here (a machine with a GPU?)"
    else
        log "as documented: fairchem 1.10's --submit cannot run a CPU job (CUDA set-up / NCCL)"
    fi
    log "submit-test ok"
}

stop_pid() {
    local name=$1 pidfile=$2 pid
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    log "stopped $name (pid $pid)"
}

cmd_stop() {
    if [ -f "$CONF" ]; then  # cancel what is left of our jobs first
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        [ -z "$jobs" ] || scancel $jobs 2>/dev/null || true
    fi
    stop_pid slurmd "$DIR/run/slurmd.pid"
    stop_pid slurmctld "$DIR/run/slurmctld.pid"
    stop_pid munged "$MUNGE/munged.pid"
}

case "${1:-}" in
    start) cmd_start ;;
    submit-test) cmd_submit_test ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    all)
        trap cmd_stop EXIT
        cmd_start
        cmd_submit_test
        ;;
    *) echo "usage: $0 start|submit-test|stop|all|status" >&2; exit 2 ;;
esac
