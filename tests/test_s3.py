"""The S3 backend against a real S3-compatible server (moto_server on 127.0.0.1)."""

import hashlib
import os

import boto3
import pytest

from stages import artifacts, storage
from stages.recipes import bootstrap, grpo
from stages.runtime import StageRun


def _client():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def test_multipart_publish_fetch_and_checksums(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("S2D_S3_MULTIPART_MB", "5")
    storage._S3.clear()
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    big = os.urandom(12 << 20)
    (work / "model" / "weights.bin").write_bytes(big)
    (work / "model" / "config.json").write_text("{}")
    stage = f"s3://{s3_bucket}/runs/r1/demo"
    m = artifacts.publish(work, stage, {"stage": "demo"})
    head = _client().head_object(Bucket=s3_bucket, Key="runs/r1/demo/model/weights.bin")
    assert head["ETag"].strip('"').endswith("-3")  # 12 MiB in 5 MiB parts: a real multipart upload
    assert m["files"]["model/weights.bin"]["sha256"] == hashlib.sha256(big).hexdigest()
    local = artifacts.fetch(f"{stage}/model", cache_dir=tmp_path / "cache")
    assert (local / "weights.bin").read_bytes() == big
    # a tampered object is refused on read
    _client().put_object(Bucket=s3_bucket, Key="runs/r1/demo/model/config.json", Body=b'{"evil": 1}')
    with pytest.raises(storage.ArtifactError, match="checksum mismatch"):
        artifacts.fetch(f"{stage}/model", cache_dir=tmp_path / "cache2")
    storage._S3.clear()


def test_missing_bucket_is_a_clear_error(s3_bucket):
    with pytest.raises(storage.ArtifactError, match="bucket 'no-such-bucket' does not exist"):
        artifacts.read_manifest("s3://no-such-bucket/runs/x/teacher_rl")


def test_stage_on_s3_failed_upload_leaves_no_manifest_and_retry_completes(s3_bucket, small_cfg, monkeypatch):
    root = f"s3://{s3_bucket}/runs/stage-test"
    cfg = small_cfg("checkpoint_every=2")
    bootstrap.main(StageRun("bootstrap", cfg, root))
    teacher = f"{root}/bootstrap/teacher"
    assert artifacts.read_manifest(f"{root}/bootstrap")["outputs"]["teacher"] == teacher

    real_put = storage.S3Store.put_file
    calls = {"n": 0}

    def flaky_put(self, local, uri):
        if "/_resume/" not in uri:  # fail while publishing the final outputs
            calls["n"] += 1
            if calls["n"] == 3:
                raise ConnectionError("connection reset by peer")
        real_put(self, local, uri)

    monkeypatch.setattr(storage.S3Store, "put_file", flaky_put)
    with pytest.raises(ConnectionError):
        grpo.main(StageRun("teacher_rl", cfg, root, inputs={"policy": teacher}), teacher)
    assert artifacts.read_manifest(f"{root}/teacher_rl") is None
    assert storage.store_for(root).list(f"{root}/teacher_rl/_resume")  # the training state survived

    monkeypatch.setattr(storage.S3Store, "put_file", real_put)
    m = grpo.main(StageRun("teacher_rl", cfg, root, inputs={"policy": teacher}), teacher)
    assert m["steps"] == 4 and artifacts.read_manifest(f"{root}/teacher_rl") == m
    assert storage.store_for(root).list(f"{root}/teacher_rl/_resume") == []
    assert (artifacts.fetch(f"{root}/teacher_rl/model") / "model.safetensors").exists()
    assert StageRun("teacher_rl", cfg, root, inputs={"policy": teacher}).finished == m
