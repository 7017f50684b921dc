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


# ------------------------------------------------------------------ issue 23 item 6: republishing leaves nothing stale


def _root(backend: str, tmp_path, request) -> str:
    if backend == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/runs/republish"
    return str(tmp_path / "root")


def _shards(folder, n: int, teacher: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.recipes.teacher_data import SCHEMA

    (folder / "data").mkdir(parents=True)
    for i in range(n):
        rows = {"problem_id": [f"{teacher}-{i}"], "prompt_len": [1], "token_ids": [[1, 5]], "token_logprobs": [[-0.5]],
                "topk_ids": [[[5, 6]]], "topk_logprobs": [[[-0.5, -1.5]]]}
        pq.write_table(pa.Table.from_pydict(rows, schema=SCHEMA), folder / "data" / f"shard-{i:05d}.parquet")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_4_shard_then_2_shard_publish_reads_2_shards(backend, tmp_path, request):
    """teacher_data's reader sees the shards of the LAST publish only: the 2 shards of the new teacher, never
    the old teacher's shards 2 and 3 still lying there from the 4-shard publish."""
    from stages.recipes import teacher_data

    stage = f"{_root(backend, tmp_path, request)}/teacher_data"
    _shards(tmp_path / "old", 4, "old")
    artifacts.publish(tmp_path / "old", stage, {"stage": "teacher_data"})
    assert len(teacher_data.load(stage)) == 4
    _shards(tmp_path / "new", 2, "new")
    artifacts.publish(tmp_path / "new", stage, {"stage": "teacher_data"})
    rows = teacher_data.load(stage)
    assert sorted(r["problem_id"] for r in rows) == ["new-0", "new-1"]
    store = storage.store_for(stage)
    assert sorted(u.rsplit("/", 1)[1] for u in store.list(stage)) == ["manifest.json", "shard-00000.parquet",
                                                                     "shard-00001.parquet"]
    # a stale shard put back by hand (or left by a publish before this fix) is not read either
    store.put_file(tmp_path / "old" / "data" / "shard-00003.parquet", f"{stage}/data/shard-00003.parquet")
    assert sorted(r["problem_id"] for r in teacher_data.load(stage)) == ["new-0", "new-1"]


def _model(folder, seed: int, sharded: bool, template: str | None):
    import torch

    from stages.config import TinyArch
    from stages.models import char_tokenizer, tiny_qwen3

    tok = char_tokenizer()
    if template:
        tok.chat_template = template
    m = tiny_qwen3(TinyArch(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32), tok, seed)
    m.save_pretrained(folder, max_shard_size="4KB" if sharded else "1GB")
    tok.save_pretrained(folder)
    return {k: v.clone() for k, v in m.state_dict().items()}, torch


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_republished_model_loads_exactly_the_new_files(backend, tmp_path, request):
    """A single-file checkpoint with a chat template, then a sharded one without: the reader (fetch +
    from_pretrained) gets the new sharded weights and no template; neither the old model.safetensors next
    to the new index nor the old chat_template.jinja is picked up."""
    from stages.models import load

    stage = f"{_root(backend, tmp_path, request)}/kl_warmup"
    _model(tmp_path / "a" / "model", 0, sharded=False, template="{{ messages[0]['content'] }}")
    assert (tmp_path / "a" / "model" / "chat_template.jinja").exists()
    artifacts.publish(tmp_path / "a", stage, {"stage": "kl_warmup"})
    new, torch = _model(tmp_path / "b" / "model", 1, sharded=True, template=None)
    assert (tmp_path / "b" / "model" / "model.safetensors.index.json").exists()
    artifacts.publish(tmp_path / "b", stage, {"stage": "kl_warmup"})
    names = {u.rsplit("/", 1)[1] for u in storage.store_for(stage).list(f"{stage}/model")}
    assert "model.safetensors" not in names and "chat_template.jinja" not in names
    model, tok = load(artifacts.fetch(f"{stage}/model", cache_dir=tmp_path / "cache"))
    assert not getattr(tok, "chat_template", None)
    for k, v in model.state_dict().items():
        assert torch.equal(v, new[k]), k
    if backend == "local":  # stale files put back by hand: the reader gets a copy of the listed files only
        import shutil

        shutil.copy(tmp_path / "a" / "model" / "model.safetensors", f"{stage}/model/model.safetensors")
        shutil.copy(tmp_path / "a" / "model" / "chat_template.jinja", f"{stage}/model/chat_template.jinja")
        folder = artifacts.fetch(f"{stage}/model", cache_dir=tmp_path / "cache")
        assert str(folder).startswith(str(tmp_path / "cache"))
        assert sorted(p.name for p in folder.iterdir()) == sorted(artifacts.listed(f"{stage}/model"))
        model, tok = load(folder)
        assert not getattr(tok, "chat_template", None)
        assert all(torch.equal(v, new[k]) for k, v in model.state_dict().items())
