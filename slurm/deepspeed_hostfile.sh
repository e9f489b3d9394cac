#!/bin/bash
# Write a DeepSpeed hostfile ("host slots=N" per node) for the current SLURM allocation.
#   slurm/deepspeed_hostfile.sh HOSTFILE [SLOTS_PER_NODE]   (default: SLURM_GPUS_ON_NODE, else 8)
set -euo pipefail
out=${1:?usage: deepspeed_hostfile.sh HOSTFILE [SLOTS_PER_NODE]}
slots=${2:-${SLURM_GPUS_ON_NODE:-8}}
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation}"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$slots/" > "$out"
echo "wrote $out: $(wc -l < "$out") node(s) x $slots slots"
