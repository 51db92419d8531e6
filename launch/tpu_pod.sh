#!/usr/bin/env bash
# A Cloud TPU VM pod slice: copy the checkout to every worker, install, and start one process per host.
# jax.distributed finds the other hosts from the TPU metadata.
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config experiments/deepseek_v2_lite.py \
#       --workdir /gcs/my-bucket/runs/v2lite --config.mesh.expert=8
# The workdir must be a path every host sees (e.g. a GCS bucket mounted with gcsfuse at /gcs/my-bucket).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" $PROJECT_FLAG --worker=all . "$TPU":~/moejax
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  cd ~/moejax && pip install -q -e '.[tpu]' && PYTHONUNBUFFERED=1 python -m moejax.train $ARGS"
