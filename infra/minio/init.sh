#!/bin/bash
# One-shot MinIO setup (compose service minio-init, minio/mc image); safe to run again.
#   bucket  $S2D_BUCKET
#   user    $S2D_STAGE_ACCESS_KEY  policy s2d-stage   (infra/s3/minio-stage-policy.json: runs/ only)
#   user    $MLFLOW_S3_ACCESS_KEY  policy s2d-mlflow  (infra/s3/minio-mlflow-policy.json: mlflow/ only)
# The policy files name the bucket S2D_BUCKET; it is substituted here.
set -euo pipefail
mc alias set s2d http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "s2d/$S2D_BUCKET"
for name in stage mlflow; do
  policy=$(cat "/policies/minio-$name-policy.json")
  printf '%s\n' "${policy//S2D_BUCKET/$S2D_BUCKET}" > "/tmp/s2d-$name.json"
  mc admin policy create s2d "s2d-$name" "/tmp/s2d-$name.json"
done
mc admin user add s2d "$S2D_STAGE_ACCESS_KEY" "$S2D_STAGE_SECRET_KEY"
mc admin user add s2d "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
# attach fails when the policy is already attached: that is the state we want
mc admin policy attach s2d s2d-stage --user "$S2D_STAGE_ACCESS_KEY" || true
mc admin policy attach s2d s2d-mlflow --user "$MLFLOW_S3_ACCESS_KEY" || true
echo "minio ready: bucket $S2D_BUCKET, users with policies s2d-stage, s2d-mlflow"
