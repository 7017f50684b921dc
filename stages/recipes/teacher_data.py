"""Stage teacher_data (before 2a): teacher rollouts with their top-k log-probs, generated ONCE by the
teacher engine and stored as Parquet, so that every warmup run and ablation with the same teacher and
prompts (``kl_warmup.form: topk``) trains from the file without loading or calling the teacher.

One row per rollout (``data/shard-NNNNN.parquet``, :data:`SCHEMA`): the prompt + completion token ids, the
teacher's log-prob of each completion token, and per completion position the teacher's ``top_k`` most
likely token ids and their log-probs (temperature 1, full-vocabulary normalised; what vLLM serves with
``prompt_logprobs=k``). The shards, the manifest (sha256 of every file) and the MLflow run come from the
normal publish path; each finished shard is saved as resumable state, so a teacher-server outage costs
at most one shard: rerun the stage and it continues.

Reuse across runs (``teacher_data.reuse``, on by default): the data is published once into a
content-addressed store, ``<store>/teacher_data/<key>/`` (``teacher_data.store``, see
:func:`stages.artifacts.shared_store`), and the stage's own manifest points at it. The key is a digest of
what determines the data (:func:`reuse_key`): the teacher's weights (the content digest of its published
files; the name of a checkpoint we did not publish), the tokenizer and its chat template, the encoded
prompts, ``top_k``, the sampling temperature and length, the seed, shard size, dtype and teacher engine. A
later run, or another student with the same tokenizer, finds the entry and publishes a manifest pointing at
it without loading the teacher (``reused`` in the manifest; the MLflow run's ``s2d.reused_from`` /
``s2d.reused.run`` tags name the entry and the run that made it).

With ``teacher.engine: server`` the server samples the rollouts (vLLM's sampler, a per-row seed) and then
scores them; with ``local`` the trainer's sampling engine and the in-process teacher do. The two engines
give the same top-k for the same tokens (tests/test_teacher_server.py), not the same sampled tokens.

    python -m stages teacher_data --config tiny --root runs/demo \
        --teacher runs/demo/teacher_rl/model --student runs/demo/bootstrap/student
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import artifacts, lock, storage
from ..rollout import Rollouts, left_pad
from ..runtime import StageRun, seed_for
from ..teacher import LocalTeacher, Teacher, open_teacher

log = logging.getLogger("stages")

SCHEMA = pa.schema([
    ("problem_id", pa.string()),
    ("prompt_len", pa.int32()),                         # tokens of the prompt (BOS included)
    ("token_ids", pa.list_(pa.int32())),                # prompt + completion, no padding
    ("token_logprobs", pa.list_(pa.float32())),         # log p_T of each completion token
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),       # [completion len][k], most likely first; -1 pads
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),  # [completion len][k]; -inf pads
])
DATA = "data"


def main(run: StageRun, teacher_uri: str, student_uri: str) -> dict:
    """The student checkpoint gives the tokenizer (only its tokenizer files are read); the teacher is the
    configured engine, checked against it. Data already in the shared store under the same key is reused."""
    tok = load_tokenizer(student_uri)
    entry = None
    if run.cfg.teacher_data.reuse:
        key, parts = reuse_key(run, teacher_uri, tok)
        entry = {"uri": storage.join(artifacts.shared_store(run.root, run.cfg.teacher_data.store), "teacher_data", key),
                 "key": key, "parts": parts}
        found = artifacts.read_manifest(entry["uri"])
        if found is not None:
            return reuse(run, tok, entry, found)
    teacher, model = open_teacher(run, teacher_uri, tok)
    try:
        return generate(run, teacher, tok, model, entry)
    finally:
        teacher.close()


def reuse_key(run: StageRun, teacher_uri: str, tok) -> tuple[str, dict]:
    """The store key of this stage's data and what it is made of (see the module docstring)."""
    cfg, d, s = run.cfg, run.cfg.teacher_data, run.cfg.sampling
    problems = run.task.problems("prompts")[: d.prompts]
    prompts = run.rollout_maker.encode(tok, problems)

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    backend = getattr(tok, "backend_tokenizer", None)
    parts = {
        "teacher": artifacts.content_digest(teacher_uri) or f"external:{teacher_uri}",
        "tokenizer": sha(type(tok).__name__ + (backend.to_str() if backend is not None else
                                               json.dumps(sorted(tok.get_vocab().items())))
                         + json.dumps(tok.special_tokens_map, sort_keys=True, default=str)),
        "chat_template": sha(f"{cfg.task.chat_template}:{getattr(tok, 'chat_template', None) or ''}"),
        "prompts": sha(json.dumps([[p.id, ids] for p, ids in zip(problems, prompts)])),
        "top_k": d.top_k, "temperature": s.temperature, "max_new_tokens": s.max_new_tokens, "seed": cfg.seed,
        "rows_per_shard": d.rows_per_shard, "dtype": cfg.dtype, "teacher_engine": cfg.teacher.engine,
    }
    return sha(json.dumps(parts, sort_keys=True)), parts


def reuse(run: StageRun, tok, entry: dict, found: dict) -> dict:
    """Publish this stage as the stored entry (nothing generated, the teacher not loaded)."""
    data = storage.join(entry["uri"], DATA)
    artifacts.check_files(data)  # its files are all there (checksums: verified by every reader)
    producer = found.get("producer", {})
    log.info("teacher_data: reusing %s (made by the run at %s)", entry["uri"], producer.get("root"))
    with run.tracking(None, {"prompts": run.task.problems("prompts")[: run.cfg.teacher_data.prompts]}):
        metrics = {**found.get("metrics", {}), "reused": 1}
        extra = {k: found[k] for k in ("teacher_engine", "top_k", "schema", "served_model") if k in found}
        extra |= {"store_key": entry["key"], "key_parts": entry["parts"],
                  "reused": {"from": entry["uri"], "key": entry["key"], "run": producer.get("run"), "root": producer.get("root")}}
        return run.publish({}, tok, metrics=metrics, extra=extra, elsewhere={"data": data})


def store(run: StageRun, entry: dict, shards, manifest: dict) -> dict | None:
    """Publish the generated shards as the store's entry (unless another run stored it first: then that
    one is used and ours dropped); returns the entry's manifest."""
    with lock.StageLock(entry["uri"]):
        found = artifacts.read_manifest(entry["uri"])
        if found is not None:
            return found
        staged = run.work / "store"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        shutil.copytree(shards, staged / DATA)
        return artifacts.publish(staged, entry["uri"], manifest)


def load_tokenizer(uri: str):
    """A checkpoint's tokenizer without its weights: a published artifact folder (only the tokenizer files,
    checksums verified), a local folder or a hub id."""
    from transformers import AutoTokenizer

    found = None if storage.uri_kind(uri) == "hub" else artifacts.find_manifest(uri)
    path = (
        artifacts.fetch(uri, only=lambda rel: "tokenizer" in rel.rsplit("/", 1)[-1] or rel.endswith("special_tokens_map.json"))
        if found
        else uri
    )
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def generate(run: StageRun, teacher: Teacher, tok, teacher_model=None, entry: dict | None = None) -> dict:
    """Generate, score and store; ``teacher_model``: the loaded teacher for the local engine (the
    trainer's sampler generates with it); ``entry``: the shared store's entry to publish the data as."""
    d = run.cfg.teacher_data
    problems = run.task.problems("prompts")[: d.prompts]
    n_shards = math.ceil(len(problems) / d.rows_per_shard)
    shards = run.work / "out" / DATA
    shards.mkdir(parents=True, exist_ok=True)
    latest = artifacts.load_state(run.uri, "shards", shards)
    done = latest["step"] if latest and latest.get("config_hash") == run.config_hash else 0
    if not done:
        for f in shards.glob("*"):
            f.unlink()
    if done:
        log.info("teacher_data: resuming after %d of %d shards", done, n_shards)
    # the MLflow run is reopened on resume (tracking() reads it from the restored state)
    with run.tracking(SimpleNamespace(resumed=latest if done else None), {"prompts": problems}):
        for i in range(done, n_shards):
            batch = problems[i * d.rows_per_shard : (i + 1) * d.rows_per_shard]
            ro = teacher_rollouts(run, teacher, tok, batch, step=i, model=teacher_model)
            table = to_table(batch, ro, *teacher.logprobs_topk(ro, d.top_k))
            pq.write_table(table, shards / f"shard-{i:05d}.parquet")
            artifacts.save_state(run.uri, "shards", i + 1, shards,
                                 {"config_hash": run.config_hash, "mlflow_run_id": run.run_id})
            run.tracker.metrics({"shards_done": i + 1}, i + 1)
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in shards.glob("*.parquet"))
        tokens = sum(pq.read_table(f, columns=["token_logprobs"]).column(0).combine_chunks().value_lengths().to_numpy().sum()
                     for f in shards.glob("*.parquet"))
        metrics = {"rows": rows, "completion_tokens": int(tokens), "top_k": d.top_k}
        extra = {"teacher_engine": teacher.engine, "top_k": d.top_k, "schema": SCHEMA.to_string(),
                 **({"served_model": teacher.model, "teacher_url": teacher.shown} if teacher.engine == "server" else {})}
        if entry is None:
            return run.publish({}, tok, metrics=metrics, extra=extra, outputs={"data": DATA})
        stored = store(run, entry, shards, {"stage": "teacher_data", "key": entry["key"], "parts": entry["parts"],
                                            "metrics": metrics, **extra,
                                            "producer": {"root": run.root, "run": run.run_id, "stage": run.uri}})
        shutil.rmtree(shards)  # published in the store, not in this stage's folder
        extra |= {"store_key": entry["key"], "key_parts": entry["parts"]}
        if stored.get("producer", {}).get("root") != run.root:  # another run stored the same data meanwhile
            extra["reused"] = {
                "from": entry["uri"],
                "key": entry["key"],
                **{k: stored["producer"].get(k) for k in ("run", "root")},
            }
        return run.publish({}, tok, metrics=metrics, extra=extra, elsewhere={"data": storage.join(entry["uri"], DATA)})


def teacher_rollouts(run: StageRun, teacher: Teacher, tok, problems, step: int, model=None) -> Rollouts:
    """The teacher's completions for ``problems``: the trainer's sampler on the local model, or the server."""
    if isinstance(teacher, LocalTeacher):
        return run.rollout_maker.sample(model, tok, problems, step)
    s = run.cfg.sampling
    prompts = run.rollout_maker.encode(tok, problems)
    comps = teacher.generate(prompts, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                             seed=seed_for(run.cfg.seed, run.stage, "", step), eos_id=tok.eos_token_id)
    return from_token_ids(prompts, comps, tok.pad_token_id, s.temperature)


def from_token_ids(prompts: list[list[int]], completions: list[list[int]], pad_id: int, temperature: float) -> Rollouts:
    """The :class:`Rollouts` layout for given prompt and completion ids (log-probs/entropy left 0)."""
    ids, attn = left_pad(prompts, pad_id)
    B, P = ids.shape
    N = max(1, max(len(c) for c in completions))
    comp_ids = torch.full((B, N), pad_id, dtype=torch.long)
    comp_att = torch.zeros((B, N), dtype=torch.long)
    for i, c in enumerate(completions):
        comp_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        comp_att[i, : len(c)] = 1
    zeros = torch.zeros((B, P + N))
    completion = torch.cat([torch.zeros_like(attn), comp_att], 1)
    return Rollouts(torch.cat([ids, comp_ids], 1), torch.cat([attn, comp_att], 1), completion, zeros,
                    zeros.clone(), P, temperature)


def to_table(problems, ro: Rollouts, chosen: torch.Tensor, topk_ids: torch.Tensor, topk_lp: torch.Tensor) -> pa.Table:
    """Rows of :data:`SCHEMA` from a scored batch (aligned like ``Teacher.score``)."""
    P = ro.prompt_len
    rows = {k: [] for k in SCHEMA.names}
    for i, p in enumerate(problems):
        att, comp = ro.attention[i].bool(), ro.completion[i, P:].bool()
        n = int(comp.sum())
        ids = ro.input_ids[i][att].tolist()
        ti, tl = topk_ids[i, P : P + n], topk_lp[i, P : P + n]
        rows["problem_id"].append(p.id)
        rows["prompt_len"].append(len(ids) - n)
        rows["token_ids"].append(ids)
        rows["topk_ids"].append(ti.tolist())
        rows["topk_logprobs"].append(tl.tolist())
        rows["token_logprobs"].append(chosen[i, P : P + n].tolist())
    return pa.Table.from_pydict(rows, schema=SCHEMA)


def load(uri: str) -> list[dict]:
    """The rows of a published teacher_data stage (checksums verified by :func:`artifacts.fetch`)."""
    uri = uri.rstrip("/")
    # the stage's manifest may point at the shared store's entry (reused, or published there)
    uri = artifacts.located(uri if uri.endswith("/" + DATA) else storage.join(uri, DATA))
    folder = artifacts.fetch(uri)
    # the shards the manifest lists, never a glob: a file an earlier publish left there is not this teacher's
    files = [folder / rel for rel in artifacts.listed(uri) if rel.endswith(".parquet")]
    if not files:
        raise storage.ArtifactError(f"{uri}: no Parquet shards")
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files]).to_pylist()


def batch_tensors(rows: list[dict], pad_id: int, temperature: float = 1.0,
                  device="cpu") -> tuple[Rollouts, torch.Tensor, torch.Tensor]:
    """Stored rows -> (Rollouts, top-k ids [B, L, k], top-k log-probs [B, L, k]) in the trainer's layout:
    column t holds the teacher distribution of token t (completion columns only; -1 / -inf elsewhere)."""
    prompts = [r["token_ids"][: r["prompt_len"]] for r in rows]
    comps = [r["token_ids"][r["prompt_len"] :] for r in rows]
    ro = from_token_ids(prompts, comps, pad_id, temperature)
    B, L = ro.input_ids.shape
    k = max((len(r["topk_ids"][0]) for r in rows if r["topk_ids"]), default=1)
    ids = torch.full((B, L, k), -1, dtype=torch.long)
    lp = torch.full((B, L, k), -torch.inf)
    P = ro.prompt_len
    for i, r in enumerate(rows):
        n = len(comps[i])
        if n:
            ids[i, P : P + n] = torch.tensor(r["topk_ids"], dtype=torch.long)
            lp[i, P : P + n] = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
            ro.logprobs[i, P : P + n] = torch.tensor(r["token_logprobs"])
    return ro.to(device), ids.to(device), lp.to(device)
