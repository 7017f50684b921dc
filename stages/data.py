"""Dataset-backed math tasks: any split from ``datasets`` (hub id, local dataset folder, Parquet / JSON(L) /
CSV files), mapped to problems and gold answers, verified on the final ``\\boxed{}`` (``stages/verify.py``).

    task:
      kind: dataset
      data:
        teacher_rl: {recipe: math, rows: [0, 6000]}            # MATH train, answer = last \\boxed{} of solution
        prompts:    {recipe: math, rows: [6000, 7000], answer_field: null}
        student_rl: {path: data/gsm8k/train.parquet, problem_field: question, answer: gsm8k}
        eval:       {recipe: math500}
        aime24:     {recipe: aime24}                            # a further eval set (eval.sets)

Every problem in a data file is checked when the task loads (``validate`` loads it too): a file that does
not exist, is empty, is not JSON (``file:line``), lacks a field, or has an empty problem is a
:class:`~stages.tasks.TaskError` naming the split, the file and the row.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

from .config import DataSource, TaskConfig
from .task_contract import LABELED, DataUnavailable, Problem, TaskError
from .verify import extract_gold, grade

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _files(src: DataSource, where: str) -> list[str] | None:
    """Local data files named by ``src.path`` (globs expanded), or None when it is not a file path."""
    paths = [src.path] if isinstance(src.path, str) else list(src.path)
    if not any(Path(p).suffix.lower() in BUILDERS for p in paths):
        return None
    out = []
    for p in paths:
        found = sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if Path(p).exists() else [])
        if not found:
            raise TaskError(f"{where}: {p} does not exist")
        out += found
    suffixes = {Path(f).suffix.lower() for f in out}
    if len(suffixes) != 1 or next(iter(suffixes)) not in BUILDERS:
        raise TaskError(f"{where}: data files must all be one of {', '.join(BUILDERS)} (got {', '.join(sorted(suffixes))})")
    for f in out:
        _check_file(f, where)
    return out


def _check_file(path: str, where: str) -> None:
    """Errors ``datasets`` reports poorly: an empty file, JSON lines that do not parse (``file:line``), and
    rows that are not objects (a JSON line or an element of a JSON array that is a number, string, list:
    ``file`` and the row named)."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise TaskError(f"{where}: {path}: empty file")
    if Path(path).suffix.lower() == ".json" and raw.lstrip().startswith(b"["):
        try:
            rows = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TaskError(f"{where}: {path}: not JSON ({getattr(e, 'msg', e)}"
                            + (f", line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ")")) from None
        if not isinstance(rows, list):  # a document that starts with '[' parses to a list
            raise TaskError(f"{where}: {path}: expected a JSON array of objects")
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise TaskError(f"{where}: {path}: row {n} of the JSON array must be an object, got {type(row).__name__}")
        return
    if Path(path).suffix.lower() in (".json", ".jsonl"):
        for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: {path}:{n}: not JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{where}: {path}:{n}: each line must be a JSON object, got {type(row).__name__}")


def load_split(src: DataSource, where: str):
    """A ``datasets.Dataset`` for one source; any failure is a one-line TaskError naming ``where``."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    files = _files(src, where)
    try:
        if files is not None:
            ds = datasets.load_dataset(BUILDERS[Path(files[0]).suffix.lower()], data_files=files, split="train")
        elif Path(src.path).is_dir() and any((Path(src.path) / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(src.path)  # a save_to_disk folder
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[src.split]
        elif isinstance(src.path, str) and Path(src.path).is_dir():
            ds = datasets.load_dataset(src.path, src.name, split=src.split)  # a folder of data files
        elif (isinstance(src.path, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", src.path) and not src.path.startswith(".")
              and not Path(src.path.split("/")[0]).is_dir()):  # data/math with ./data present: a missing folder
            try:
                ds = datasets.load_dataset(src.path, src.name, split=src.split)  # a hub id
            except (ConnectionError, OSError) as e:
                raise DataUnavailable(f"{where}: hub dataset {src.path} cannot be read here ({type(e).__name__}: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        else:
            raise TaskError(f"{where}: {src.path} does not exist")
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskError(f"{where}: cannot read {src.path}: {type(e).__name__}: {msg}") from None
    if src.rows is not None:
        lo, hi = min(src.rows[0], len(ds)), min(src.rows[1], len(ds))
        ds = ds.select(range(lo, hi) if hi > lo else [])
    return ds


class DatasetTask:
    """Math problems from ``task.data`` (or ``task.files`` for ``math_jsonl``), rewarded 1 when the
    completion's final ``\\boxed{}`` equals the gold answer (math-verify)."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        if cfg.kind == "math_jsonl":
            self.sources = {s: DataSource(path=p, id_field="id") for s, p in cfg.files.items()}
            self.where = {s: f"task.files.{s}" for s in cfg.files}
        else:
            self.sources = dict(cfg.data)
            self.where = {s: f"task.data.{s}" for s in cfg.data}
        self._cache: dict[str, list[Problem]] = {}
        self._worked: dict[Problem, str] = {}  # labeled problem -> its worked solution
        self.warnings: list[str] = []

    def splits(self) -> list[str]:
        return list(self.sources)

    def problems(self, split: str) -> list[Problem]:
        if split not in self.sources:
            raise KeyError(f"no data for split '{split}' ({self.where_root} has {', '.join(self.sources)})")
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return self._cache[split]

    @property
    def where_root(self) -> str:
        return "task.files" if self.cfg.kind == "math_jsonl" else "task.data"

    def _load(self, split: str) -> list[Problem]:
        src, where = self.sources[split], self.where[split]
        ds = load_split(src, where)
        labeled = split != "prompts" and src.answer_field is not None
        fields = [src.problem_field] + ([src.answer_field] if labeled else [])
        if src.id_field and src.id_field in ds.column_names:
            fields.append(src.id_field)
        elif src.id_field and self.cfg.kind != "math_jsonl":
            raise TaskError(f"{where}: {src.path} has no field '{src.id_field}' (fields: {', '.join(ds.column_names)})")
        for f in fields:
            if f not in ds.column_names:
                raise TaskError(f"{where}: {src.path} has no field '{f}' (fields: {', '.join(ds.column_names)})")
        if split in LABELED and not labeled:
            raise TaskError(f"{where}: split '{split}' needs answers (answer_field is null)")
        limit = self.cfg.sizes.get(split)
        if limit is not None and len(ds) > limit:
            ds = ds.select(range(limit))
        if len(ds) == 0:
            raise TaskError(f"{where}: {src.path} has no rows" + (f" in rows {list(src.rows)}" if src.rows else ""))
        cols = {f: ds[f] for f in fields}
        out, skipped = [], 0
        for i, problem in enumerate(cols[src.problem_field]):
            row = i + (src.rows[0] if src.rows else 0)
            if problem is not None and not isinstance(problem, str):
                raise TaskError(f"{where}: {src.path} row {row + 1}: '{src.problem_field}' is {type(problem).__name__}, "
                                "not text")
            if problem is None or not problem.strip():
                raise TaskError(f"{where}: {src.path} row {row + 1}: empty '{src.problem_field}'")
            answer = None
            if labeled:
                raw = cols[src.answer_field][i]
                if raw is None or not str(raw).strip():
                    raise TaskError(f"{where}: {src.path} row {row + 1}: empty '{src.answer_field}'")
                answer = extract_gold(raw, src.answer)
                if answer is None:  # e.g. a MATH solution without a \boxed{}: nothing to verify against
                    skipped += 1
                    continue
            pid = str(cols[src.id_field][i]) if src.id_field in cols else f"{split}-{row}"
            out.append(Problem(pid, self.cfg.prompt_template.format(problem=problem), answer))
            if labeled:
                self._worked[out[-1]] = _worked_solution(str(cols[src.answer_field][i]), answer, src.answer)
        if skipped:
            self.warnings.append(
                f"{where}: {skipped} of {len(ds)} rows skipped: no '{src.answer}' answer in '{src.answer_field}'"
            )
        if not out:
            raise TaskError(f"{where}: no usable rows in {src.path}")
        return out

    def reward(self, completion: str, problem: Problem) -> float:
        return grade(completion, problem.answer, self.cfg.answer_format)

    def solution(self, problem: Problem, rng=None, noise: float = 0.0) -> str:
        """The dataset's worked solution ending in ``\\boxed{answer}`` (``task.data.bootstrap`` trains the
        tiny base models on these); with probability ``noise`` the final answer is another problem's."""
        text = self._worked.get(problem) or f"\\boxed{{{problem.answer}}}"
        if rng is not None and rng.random() < noise:
            wrong = rng.choice(list(self._worked)).answer if self._worked else problem.answer
            if wrong != problem.answer:
                text = text[: text.rfind("\\boxed{")] + f"\\boxed{{{wrong}}}"
        return text

    def check(self) -> list[str]:
        """Load every split (errors raise), then warn about problems shared by held-out and training splits."""
        for s in self.sources:
            self.problems(s)
        return self.warnings + overlap_warnings({s: self.problems(s) for s in self.sources})


def _worked_solution(raw: str, answer: str, how: str) -> str:
    """A completion that ends in the boxed gold answer: MATH's solution as is, GSM8K's reasoning with its
    ``#### answer`` line boxed, a plain answer boxed on its own."""
    if how == "boxed":
        return raw.strip()
    if how == "gsm8k":
        return f"{raw.rsplit('####', 1)[0].strip()}\nThe answer is \\boxed{{{answer}}}."
    return f"\\boxed{{{answer}}}"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


TRAINING = ("bootstrap", "teacher_rl", "prompts", "student_rl")


def overlap_warnings(splits: dict[str, list[Problem]]) -> list[str]:
    """Held-out splits (eval, validation, further eval sets) must not share problems with training splits,
    nor teacher_rl with student_rl (the paper's disjoint labeled splits)."""
    texts = {s: {_norm(p.prompt) for p in ps} for s, ps in splits.items()}
    held = [s for s in splits if s not in TRAINING]
    pairs = [(h, t) for h in held for t in TRAINING if t in texts] + [("student_rl", "teacher_rl")]
    out = []
    for a, b in pairs:
        if a in texts and b in texts and (n := len(texts[a] & texts[b])):
            out.append(f"task: {n} of {len(texts[a])} '{a}' problems also appear in '{b}' (splits should be disjoint)")
    return out
