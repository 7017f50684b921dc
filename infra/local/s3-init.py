"""minio-init's stand-in (infra/compose.local.yaml): create the bucket on the S3 service, idempotently.

MinIO's init also creates the stage and MLflow users and attaches least-privilege policies
(infra/minio/init.sh); moto's server has no such admin API and accepts any key, so here every
credential in infra/.env reaches the whole bucket.
"""

import os

import boto3

s3 = boto3.client(
    "s3",
    endpoint_url="http://minio:9000",
    aws_access_key_id=os.environ["MINIO_ROOT_USER"],
    aws_secret_access_key=os.environ["MINIO_ROOT_PASSWORD"],
    region_name="us-east-1",
)
bucket = os.environ["S2D_BUCKET"]
if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
    s3.create_bucket(Bucket=bucket)
print(f"s3 ready: bucket {bucket} (no users or policies: the stand-in accepts any key)")
