"""The stage contract.

A stage kind is a small class with a typed ``Config`` (pydantic), a ``version`` (bump it when
its output changes meaning), declared resources (from the DAG's ``resources:``), its input and
output tables, and either

* a **per-sample** body (:class:`MapStage`): ``plan_work`` on the driver says which samples need
  computing (incremental: new, changed digest, or another fingerprint), ``setup`` runs once per
  worker (load a model), ``process_batch`` turns a batch of input rows into output rows and
  quarantine records. The same class runs in-process in a unit test (:class:`InProcessExecutor`)
  and in a Ray Data actor pool in the DAG (``pipelines.dag.ray_exec.RayDataExecutor``); or
* a **job** body (:class:`JobStage`): ``run`` does the whole thing (a Ray Train job, an eval).

The driver commits a per-sample stage's results in chunks of ``chunk_size`` rows, each chunk one
atomic Delta commit (output first, then its quarantine records), so a killed run loses at most a
chunk and a re-run continues where it stopped. A sample whose ``process_batch`` raises is
retried alone; if it raises again it is quarantined with the exception text.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import json
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, ClassVar
from collections.abc import Callable, Container, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from pipelines.errors import DagError, StageError
from vgen_core.data.schemas import QUARANTINE, SCHEMA_VERSION, SOURCE_ITEMS
from vgen_core.faults import fault_point
from vgen_core.tracking import NullTracker, Tracker

__all__ = [
    "StageConfig", "OutputRef", "Counts", "StageContext", "StageResult", "StageError",
    "BatchResult", "Work", "Stage", "MapStage", "SourceStage", "JobStage", "InProcessExecutor",
    "quarantine_record", "FILTER_PREFIX", "TRANSIENT_CHECKS", "BUILTIN_ROOTS", "root_problem",
    "file_problem", "SOURCES_STAMP", "SOURCES_VERIFY", "first_file", "cpu_only",
]


class StageConfig(BaseModel):
    """Base of every stage kind's config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class OutputRef:
    """Something a stage produced: a Delta table (uri + version) or a model (uri + digest)."""

    kind: str  # "table" | "model"
    name: str  # table name in the store, or the model directory under the root
    uri: str
    version: int | None = None
    digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OutputRef:
        return cls(**d)


@dataclass
class Counts:
    """processed: rows written; skipped: already done; quarantined: failed a check (counts
    against the error budget); filtered: valid but removed by a configured filter (recorded in
    the quarantine table with check ``filter:<name>``, never against the budget)."""

    processed: int = 0
    skipped: int = 0
    quarantined: int = 0
    filtered: int = 0

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class StageContext:
    """What a stage knows about where it runs. ``inputs`` maps each upstream stage to its
    outputs."""

    dag: str
    stage: str
    store: Any  # vgen_core.data.TableStore
    row_fingerprint: str
    inputs: dict[str, dict[str, OutputRef]] = field(default_factory=dict)
    resources: Any = None  # pipelines.dag.spec.ResourcesSpec
    error_budget: float = 0.01
    chunk_size: int = 256
    tracker: Tracker = field(default_factory=NullTracker)
    tracking_uri: str | None = None
    cluster: dict[str, float] = field(default_factory=dict)  # total CPU / GPU of the cluster
    progress: Callable[[Counts, int], None] | None = None
    #: training stages: ``(optimizer step, total steps, last logged metrics)`` as the run goes
    step_progress: Callable[[int, int, dict[str, float]], None] | None = None
    #: source stages: decide what changed by content, not size + mtime (:class:`SourceStage`)
    verify_sources: bool = False

    def for_worker(self) -> StageContext:
        """The part of the context that travels to Ray workers (no tracker, no callbacks)."""
        return dataclasses.replace(self, tracker=NullTracker(), progress=None,
                                   step_progress=None)

    def input_ref(self, upstream: str, output: str) -> OutputRef:
        try:
            return self.inputs[upstream][output]
        except KeyError:
            raise StageError(
                f"stage '{self.stage}': upstream '{upstream}' produced no '{output}' output "
                f"(it produced: {sorted(self.inputs.get(upstream, {}))})"
            ) from None


@dataclass
class StageResult:
    outputs: dict[str, OutputRef]
    counts: Counts = field(default_factory=Counts)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class BatchResult:
    rows: pa.Table
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    #: keys of the work items this result covers (source stages: recorded once committed)
    items: list[str] = field(default_factory=list)
    #: data files a worker wrote to the output table (``TableStore.write_data_file`` records);
    #: ``rows`` then holds only their keys (sample_id, content_digest): the payload never
    #: travels to the driver, which commits the files' metadata
    files: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Work:
    """What a per-sample stage must compute this run.

    Either ``items`` (a small table of work items the driver listed: file paths, ...) or a Delta
    table (``table_uri`` at ``table_version``) restricted to the ``todo`` keys
    (sample_id, content_digest). ``total`` counts every candidate, ``skipped`` the ones already
    done.
    """

    total: int
    skipped: int
    items: pa.Table | None = None
    table_name: str | None = None
    table_uri: str | None = None
    table_version: int | None = None
    todo: pa.Table | None = None
    #: why the to-do samples are to do: new / changed (digest) / stale (other fingerprint)
    breakdown: dict[str, int] = field(default_factory=dict)
    #: input columns the stage reads (None: all); projected at the Delta scan
    columns: list[str] | None = None

    @property
    def todo_count(self) -> int:
        if self.items is not None:
            return self.items.num_rows
        return 0 if self.todo is None else self.todo.num_rows


FILTER_PREFIX = "filter:"
#: quarantine checks that say nothing about the sample's content (the file could not be read, an
#: unexpected exception): a source stage reads such items again on the next run and keeps their
#: rows until a read succeeds (``SourceStage.record_items``)
TRANSIENT_CHECKS = frozenset({"read", "exception"})
#: how a source stage decides an item changed (``SourceStage.sources_mode``, ``vgen plan``)
SOURCES_STAMP, SOURCES_VERIFY = "size+mtime", "content (verify)"
#: keys per DELETE commit when a source stage removes samples / records (``SourceStage.finalize``)
DELETE_BATCH = 1000


def quarantine_record(
    sample_id: str,
    check: str,
    reason: str,
    *,
    content_digest: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """One quarantine row (stage and fingerprint are filled in by the driver)."""
    return {
        "sample_id": sample_id,
        "content_digest": content_digest,
        "check": check,
        "reason": reason,
        "source": source,
    }


#: roots of data built into vgen (nothing on disk to check before a run)
BUILTIN_ROOTS = ("skimage://", "sample://")


def _field_hint(config: StageConfig, name: str) -> str:
    info = type(config).model_fields.get(name)
    desc = getattr(info, "description", None)
    return f"; expected {desc}" if desc else ""


def root_problem(uri: str) -> str | None:
    """Why the data root ``uri`` cannot be read (None when it can): it must exist and, when it
    is a local folder, be listable. ``skimage://`` / ``sample://`` are built in. Cheap: one
    ``exists`` (an S3 prefix: one LIST of at most one key), no listing of the tree."""
    if uri.startswith(BUILTIN_ROOTS):
        return None
    return _path_problem(uri, want_file=False)


def first_file(uri: str, suffixes: tuple[str, ...] = ()) -> str | None:
    """The first file under the folder or prefix ``uri`` (any depth) whose name ends with one
    of ``suffixes`` (case-insensitive; any file but dot-files when empty), or None when there is
    none. A walk that stops at the first match, not a listing of the tree; ``uri`` may also be
    the file itself."""
    from vgen_core.data.fsio import filesystem_for

    fs, path = filesystem_for(uri)

    def wanted(name: str) -> bool:
        name = name.rsplit("/", 1)[-1].lower()
        return name.endswith(suffixes) if suffixes else not name.startswith(".")

    if fs.isfile(path):
        return path if wanted(path) else None
    for folder, _dirs, files in fs.walk(path):
        for name in sorted(files):
            if wanted(name):
                return f"{folder.rstrip('/')}/{name}"
    return None


def file_problem(uri: str) -> str | None:
    """Why the file ``uri`` (weights, a reference batch) cannot be read (None when it can)."""
    return _path_problem(uri, want_file=True)


def weights_problem(uri: str) -> str | None:
    """Why ``weights:`` ``uri`` cannot be loaded: it must be a file, or a folder holding
    ``model.safetensors`` (an export of `vgen weights convert` / a train stage, or an HF
    snapshot)."""
    why = _path_problem(uri, want_file=False)
    if why is not None:
        return why
    from vgen_core.data.fsio import filesystem_for

    fs, path = filesystem_for(uri)
    if fs.isdir(path):
        if not fs.exists(f"{path.rstrip('/')}/model.safetensors"):
            return (f"{uri!r} is a folder without model.safetensors (give a checkpoint file, "
                    "a folder written by `vgen weights convert`, or an HF snapshot folder)")
    return None


def _path_problem(uri: str, *, want_file: bool) -> str | None:
    from fsspec.implementations.local import LocalFileSystem

    from vgen_core.data.fsio import filesystem_for

    try:
        fs, path = filesystem_for(uri)
    except Exception as e:  # unknown protocol, missing driver (s3fs), malformed URL
        return f"cannot open {uri!r}: {type(e).__name__}: {e}"
    local = isinstance(fs, LocalFileSystem)
    try:
        if not fs.exists(path):
            what = "file" if want_file else "folder or prefix"
            return f"{uri!r} does not exist (no such {what})"
        is_dir = fs.isdir(path)
    except Exception as e:  # credentials, endpoint, network
        return f"{uri!r} cannot be reached: {type(e).__name__}: {e}"
    if want_file and is_dir:
        return f"{uri!r} is a folder, not a file"
    if local:
        if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
            return f"{uri!r} is not readable (permission denied)"
        if is_dir:
            try:
                with os.scandir(path) as it:
                    next(it, None)
            except OSError as e:
                return f"{uri!r} cannot be listed: {e.strerror or e}"
    return None


class Stage:
    """Base of every stage kind. Subclasses set ``kind``, ``version``, ``Config``."""

    kind: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = StageConfig
    #: upstream stages this kind expects, as (min, max); max None = any number
    needs_range: ClassVar[tuple[int, int | None]] = (0, None)
    #: the planner's fingerprint of this run of the stage (input versions included); set by the
    #: runner before ``run`` (None when a stage is built outside a DAG run)
    stage_fingerprint: str | None = None
    #: config fields naming a data root (folder, s3:// prefix, or a built-in ``skimage://`` /
    #: ``sample://``) the stage lists: checked to exist before anything runs
    root_fields: ClassVar[tuple[str, ...]] = ()
    #: config fields naming a file the stage reads when set (weights, a reference batch):
    #: checked to exist before anything runs
    file_fields: ClassVar[tuple[str, ...]] = ()
    #: config fields naming model weights: a file, or an export folder (checked the same way)
    weights_fields: ClassVar[tuple[str, ...]] = ()
    #: the kind calls Ray itself (a Ray Train job): the runner connects to Ray before planning
    #: it. Other kinds reach Ray only through their executor, which connects when the work is
    #: too big to run in the driver (``pipelines.dag.ray_exec.RayDataExecutor``)
    needs_ray: ClassVar[bool] = False
    #: modules the kind's work imports: when a stage of it is to run the runner imports them on
    #: a background thread at the start of the DAG (torch's ~1.5 s then overlaps earlier stages
    #: and waits instead of delaying this one); source stages read files with PIL / numpy only
    warm_imports: ClassVar[tuple[str, ...]] = ("torch",)

    def __init__(self, config: StageConfig, ctx: StageContext):
        self.config, self.ctx = config, ctx
        self.metrics: dict[str, float] = {}  # reported with the result (MLflow, status)

    # -- planning -------------------------------------------------------------------------
    @classmethod
    def check_needs(cls, name: str, spec: Any, dag: Any, source: str) -> None:
        lo, hi = cls.needs_range
        n = len(spec.needs)
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'any'}"
            raise DagError(
                f"`{cls.kind}` needs {want} upstream stage(s), got {n}",
                file=source,
                stage=name,
                field="needs",
            )

    def check_config(self) -> list[tuple[str, str]]:
        """Problems with what the config points at outside the DAG, found without computing or
        writing anything: ``(field, what is wrong)`` pairs (field as ``with.<name>``), ``[]``
        when there are none. The default checks the ``*_fields`` (root, file, weights); a kind
        with other inputs extends it (``super().check_config() + [...]``). The runner asks
        every stage before Ray starts and before the MLflow run is opened (``vgen run`` then
        exits 2); ``vgen plan`` / ``vgen status`` show the problems as state ``invalid``."""
        problems = []
        for name, check in [(n, root_problem) for n in self.root_fields] + [
            (n, file_problem) for n in self.file_fields
        ] + [(n, weights_problem) for n in self.weights_fields]:
            value = getattr(self.config, name, None)
            if isinstance(value, str) and value:
                why = check(value)
                if why is None and name in self.weights_fields:
                    why = self._export_problem(value)
                if why:
                    problems.append((f"with.{name}", why + _field_hint(self.config, name)))
        return problems

    def weights_target(self) -> tuple[str, Any, str | None] | None:
        """(family, model config, pixel range) the ``weights_fields`` load into, for checking an
        export folder's family, config and declared pixel range before anything runs (None:
        not checked here)."""
        return None

    def _export_problem(self, uri: str) -> str | None:
        from vgen_core.weights import export_problem, export_uri

        try:
            target = self.weights_target()
        except Exception:  # a config problem reported elsewhere (unknown family, size)
            return None
        return None if target is None else export_problem(export_uri(uri), *target)

    def source_fingerprint(self) -> dict[str, Any]:
        """A cheap description of inputs outside the DAG (file listings); part of the
        fingerprint."""
        return {}

    def row_fingerprint_parts(self) -> dict[str, Any]:
        """What each output row depends on besides kind/version/config (e.g. weights digest)."""
        return {}

    def table_name(self, suffix: str = "") -> str:
        return f"{self.ctx.dag}/{self.ctx.stage}{suffix}"

    def run(self, executor: Any = None) -> StageResult:  # pragma: no cover - abstract
        raise NotImplementedError


class JobStage(Stage):
    """A stage that runs as a whole (training, evaluation)."""


class MapStage(Stage):
    """A per-sample stage. See the module docstring."""

    output_schema: ClassVar[pa.Schema]
    #: "append": side tables keyed by (sample_id, content_digest, fingerprint);
    #: "upsert": curated tables with one row per sample_id.
    write_mode: ClassVar[str] = "append"
    #: on Ray, workers write the output's data files and the driver commits their metadata
    #: (:meth:`write_file`); False: rows stream back to the driver, which writes them
    worker_writes: ClassVar[bool] = True
    needs_range = (1, 1)

    def write_file(self, result: BatchResult) -> BatchResult:
        """Worker side: write ``result.rows`` as a data file of the output table and return the
        result with only the rows' keys and the file's record (:attr:`BatchResult.files`). The
        file is named from the stage's row fingerprint and the rows' keys, so a retried batch
        rewrites its file rather than adding a second one."""
        import hashlib

        rows = self._conform(result.rows)
        if not rows.num_rows:
            return result
        keys = rows.select(["sample_id", "content_digest"])
        h = hashlib.sha256(self.ctx.row_fingerprint.encode())
        for k in sorted(row_keys(keys).to_pylist()):
            h.update(k.encode() + b"\n")
        info = self.ctx.store.write_data_file(self.table_name(), rows, file_id=h.hexdigest()[:40])
        return BatchResult(keys, result.quarantine, result.items, [info])

    def table_name(self, suffix: str = "") -> str:
        """Side tables (append mode) get one Delta table per row fingerprint,
        ``<dag>/<stage>/<fingerprint[:16]>``: another tokenizer (weights, preprocessing, code)
        writes a new table and the old one stays readable. Curated tables and the quarantine
        table are ``<dag>/<stage>[suffix]``."""
        if self.write_mode == "append" and not suffix:
            return f"{self.ctx.dag}/{self.ctx.stage}/{self.ctx.row_fingerprint[:16]}"
        return super().table_name(suffix)

    def sibling_tables(self) -> list[str]:
        """This stage's side tables made by other fingerprints (oldest names first)."""
        if self.write_mode != "append":
            return []
        mine = self.table_name()
        return [
            t for t in self.ctx.store.list_tables(f"{self.ctx.dag}/{self.ctx.stage}") if t != mine
        ]

    # driver side ---------------------------------------------------------------------------
    def plan_work(self) -> Work:
        """Default: the upstream 'samples' table minus what this fingerprint already did."""
        ref = self.samples_input()
        store = self.ctx.store
        current = store.read(ref.name, version=ref.version, columns=["sample_id", "content_digest"])
        done = self.done_keys()
        todo = (
            current.join(done, keys=["sample_id", "content_digest"], join_type="left anti")
            if done.num_rows
            else current
        )
        return Work(
            total=current.num_rows,
            skipped=current.num_rows - todo.num_rows,
            table_name=ref.name,
            table_uri=ref.uri,
            table_version=ref.version,
            todo=todo,
            breakdown=self._breakdown(todo),
            columns=self.input_columns(),
        )

    def input_columns(self) -> list[str] | None:
        """Columns of the upstream table ``process_batch`` needs (None: all of them)."""
        return None

    def commit_metadata(self) -> dict[str, str]:
        """Extra key/values recorded on every commit of the output (e.g. the preprocessing a
        side table's rows were made with, which readers check against what they need)."""
        return {}

    def _breakdown(self, todo: pa.Table) -> dict[str, int]:
        """Split the to-do samples: ``new`` (sample_id never processed), ``changed`` (processed,
        but not at this digest), ``stale_tokenizer`` (this digest done by another fingerprint)."""
        store = self.ctx.store
        names = [n for n in [self.table_name(), *self.sibling_tables()] if store.exists(n)]
        if not todo.num_rows or not names:
            return {"new": todo.num_rows, "changed": 0, "stale_tokenizer": 0}
        cols = ["sample_id", "content_digest"]
        seen = (
            pa.concat_tables(
                [
                    store.read(n, columns=cols).cast(
                        pa.schema([pa.field(c, pa.string()) for c in cols])
                    )
                    for n in names
                ]
            )
            .group_by(cols)
            .aggregate([])
        )
        other_fp = todo.join(seen, keys=cols, join_type="left semi").num_rows
        rest = todo.join(seen, keys=cols, join_type="left anti")
        ids = seen.select(["sample_id"]).group_by(["sample_id"]).aggregate([])
        changed = rest.join(ids, keys=["sample_id"], join_type="left semi").num_rows
        return {"new": rest.num_rows - changed, "changed": changed, "stale_tokenizer": other_fp}

    def samples_input(self) -> OutputRef:
        """The upstream 'samples' table this stage maps over (exactly one upstream has one)."""
        refs = [outs["samples"] for outs in self.ctx.inputs.values() if "samples" in outs]
        if len(refs) != 1:
            raise StageError(
                f"stage '{self.ctx.stage}': expected exactly one upstream stage "
                f"with a 'samples' table, found {len(refs)}"
            )
        return refs[0]

    def done_keys(self) -> pa.Table:
        """(sample_id, content_digest) already in the output or quarantine for this fingerprint."""
        store, fp = self.ctx.store, self.ctx.row_fingerprint
        cols = ["sample_id", "content_digest"]
        parts = []
        for name in (self.table_name(), self.table_name("__quarantine")):
            if store.exists(name):
                t = store.read(name, columns=cols + ["fingerprint"])
                t = t.filter(pc.equal(t["fingerprint"], fp)).select(cols)
                parts.append(t.cast(pa.schema([pa.field(c, pa.string()) for c in cols])))
        if not parts:
            return pa.table({c: pa.array([], pa.string()) for c in cols})
        return pa.concat_tables(parts).group_by(cols).aggregate([])

    # worker side ---------------------------------------------------------------------------
    def prepare_args(self) -> dict[str, Any] | None:
        """Driver side: keyword arguments of ``prepare_batch``; None (default) when the stage
        has no prepare step."""
        return None

    def prepare_batch(self, batch: pa.Table, **kwargs: Any) -> pa.Table:
        """Worker-side CPU work that needs no model (decode, resize). The Ray executor runs it
        as tasks ahead of the actor pool, so it overlaps the model's compute on other cores;
        ``process_batch`` gets its output (and must also accept raw rows: in-process it runs
        alone)."""
        return batch

    def setup(self) -> None:
        """Runs once per worker before the first batch (load a model here)."""

    def process_batch(self, batch: pa.Table) -> BatchResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def safe_process(self, batch: pa.Table) -> BatchResult:
        """``process_batch``, falling back to one sample at a time so one bad sample is
        quarantined with its exception instead of failing the batch."""
        try:
            return self.process_batch(batch)
        except Exception:
            if batch.num_rows == 1:
                return self._quarantine_exception(batch)
        rows, quarantine = [], []
        for i in range(batch.num_rows):
            one = batch.slice(i, 1)
            try:
                r = self.process_batch(one)
            except Exception:
                r = self._quarantine_exception(one)
            if r.rows.num_rows:
                rows.append(r.rows)
            quarantine.extend(r.quarantine)
        table = pa.concat_tables(rows) if rows else self.output_schema.empty_table()
        return BatchResult(table, quarantine)

    def _quarantine_exception(self, one: pa.Table) -> BatchResult:
        row = one.to_pylist()[0]
        exc = traceback.format_exc(limit=3).strip().splitlines()
        reason = exc[-1] if exc else "unknown error"
        q = quarantine_record(
            str(row.get("sample_id", row.get("path", "?"))),
            "exception",
            f"{reason}\n{chr(10).join(exc[:-1])}",
            content_digest=row.get("content_digest"),
            source=row.get("source") or row.get("path"),
        )
        return BatchResult(self.output_schema.empty_table(), [q])

    # driver: commit ------------------------------------------------------------------------
    def run(self, executor: Any = None) -> StageResult:
        """Plan, execute (in-process by default), commit chunk by chunk, enforce the budget."""
        executor = executor or InProcessExecutor()
        store, ctx = self.ctx.store, self.ctx
        out_name, q_name = self.table_name(), self.table_name("__quarantine")
        extra = self.commit_metadata()
        store.create(out_name, self.output_schema, description=json_dumps(extra) if extra else None)
        store.create(q_name, QUARANTINE)
        work = self.plan_work()
        counts = Counts(skipped=work.skipped)
        meta = {
            "vgen.stage": ctx.stage,
            "vgen.fingerprint": ctx.row_fingerprint,
            "vgen.schema_version": str(SCHEMA_VERSION),
            **self.commit_metadata(),
        }
        if ctx.progress:
            ctx.progress(counts, work.total)
        pending_rows: list[pa.Table] = []
        pending_q: list[dict[str, Any]] = []
        pending_items: list[str] = []
        pending_ids: list[pa.Array] = []
        pending_files: list[dict[str, Any]] = []
        file_ids: set[str] = set()  # upsert: sample_ids added as files in this run
        known = self.known_ids() if self.write_mode == "upsert" else None  # once per run
        self._budget_example = None
        recorded: dict[tuple[str, str | None], tuple[str, str]] | None = None

        def flush() -> None:
            nonlocal recorded
            # samples that failed for a reason that may pass on a retry (an I/O error, an
            # unexpected exception): their items are neither recorded nor cleaned up
            retry_ids = frozenset(r["sample_id"] for r in pending_q
                                  if r["check"] in TRANSIENT_CHECKS)
            if pending_files:  # written by workers: only their metadata is committed here
                fault_point("before_data_commit")
                store.commit_data_files(out_name, pending_files, commit_metadata=meta)
                fault_point("after_data_commit")
                counts.processed += sum(int(f["num_rows"]) for f in pending_files)
            if pending_rows:
                rows = pa.concat_tables(pending_rows)
                if rows.num_rows:
                    fault_point("before_data_commit")
                    self._write(out_name, rows, meta)
                    fault_point("after_data_commit")
                counts.processed += rows.num_rows
            if pending_q:
                if recorded is None:  # read once per run, at the first chunk that quarantines
                    recorded = self.recorded_quarantine()
                fresh, replaced, known = self._new_quarantine(pending_q, recorded)
                counts.skipped += known  # recorded by an earlier attempt (a crash re-run)
                if replaced:  # same key, another outcome: the latest outcome replaces it
                    for i in range(0, len(replaced), 200):
                        store.delete(
                            q_name,
                            self._quarantine_predicate(replaced[i : i + 200]),
                            commit_metadata=meta,
                        )
                now = dt.datetime.now(dt.timezone.utc)
                recs = [
                    dict(r, stage=ctx.stage, fingerprint=ctx.row_fingerprint, created_at=now)
                    for r in fresh
                ]
                if recs:
                    store.append(
                        q_name, pa.Table.from_pylist(recs, schema=QUARANTINE), commit_metadata=meta
                    )
                    fault_point("after_quarantine_commit")
                for r in recs:
                    recorded[(r["sample_id"], r.get("content_digest"))] = (r["check"], r["reason"])
                    if self._budget_example is None and not r["check"].startswith(FILTER_PREFIX):
                        self._budget_example = (
                            f"{r['sample_id']} ({r['check']}): "
                            f"{(r['reason'] or '').splitlines()[0][:300]}"
                        )
                n_filtered = sum(1 for r in recs if r["check"].startswith(FILTER_PREFIX))
                counts.filtered += n_filtered
                counts.quarantined += len(recs) - n_filtered
            if pending_items:  # after the data: a crash in between only redoes these items
                fault_point("before_sources_record")
                self.record_items(pending_items, pa.chunked_array(pending_ids, pa.string()),
                                  transient=retry_ids)
                fault_point("after_sources_record")
            pending_rows.clear()
            pending_files.clear()
            pending_q.clear()
            pending_items.clear()
            pending_ids.clear()
            if ctx.progress:
                ctx.progress(counts, work.total)
            self._check_budget(counts, work.total)

        if work.todo_count:
            n_pending = 0
            for result in executor.execute(self, work):
                if result.files:
                    conformed = result.rows.select(["sample_id", "content_digest"]).cast(
                        pa.schema([pa.field(c, pa.string()) for c in
                                   ("sample_id", "content_digest")]))
                else:
                    conformed = self._conform(result.rows)
                if result.items:
                    pending_items.extend(result.items)
                    pending_ids.append(conformed["sample_id"].combine_chunks())
                rows, unchanged = self.filter_results(conformed)
                counts.skipped += unchanged
                if result.files and not unchanged and self._may_add(rows, known, file_ids):
                    pending_files.extend(result.files)
                elif result.files:  # rows to merge or drop: read the worker's file back
                    rows, _ = self.filter_results(
                        self._conform(store.read_data_files(out_name, result.files)))
                    pending_rows.append(rows)
                else:
                    pending_rows.append(rows)
                pending_q.extend(result.quarantine)
                n_pending += result.rows.num_rows + len(result.quarantine)
                if n_pending >= ctx.chunk_size:
                    flush()
                    n_pending = 0
            flush()
        self.finalize()
        self._check_budget(counts, work.total)
        append = self.write_mode == "append"
        outputs = {
            # for side tables, digest = the row fingerprint readers select on
            "samples": OutputRef(
                "table",
                out_name,
                store.uri(out_name),
                version=store.version(out_name),
                digest=ctx.row_fingerprint if append else None,
            ),
            "quarantine": OutputRef(
                "table", q_name, store.uri(q_name), version=store.version(q_name)
            ),
        }
        if work.table_name is not None:  # the curated version these rows are current for
            outputs["source"] = self.samples_input()
        return StageResult(outputs=outputs, counts=counts, metrics=dict(self.metrics))

    def _may_add(self, keys: pa.Table, known: Container[str] | None, added: set[str]) -> bool:
        """Whether a worker's file of these rows can join the table as it is: always for side
        tables (append); for curated tables (upsert, one row per sample_id) only when none of
        its sample_ids is in ``known`` (:meth:`known_ids`, read once per run) or in a file added
        earlier in this run (else MERGE)."""
        if self.write_mode != "upsert":
            return True
        ids = keys["sample_id"].to_pylist()
        if known is None or any(i in known for i in ids):
            return False
        if added.intersection(ids) or len(set(ids)) != len(ids):
            return False
        added.update(ids)
        return True

    def _conform(self, rows: pa.Table) -> pa.Table:
        return rows.select(self.output_schema.names).cast(self.output_schema)

    def _write(self, name: str, rows: pa.Table, meta: dict[str, str]) -> None:
        """One atomic commit. Upsert mode MERGEs only rows whose sample_id the table may already
        hold; a chunk of new samples is a plain append (a MERGE rewrites files: much slower)."""
        store = self.ctx.store
        if self.write_mode != "upsert":
            store.append(name, rows, commit_metadata=meta)
            return
        known = self.known_ids()
        if known is not None and not any(i in known for i in rows["sample_id"].to_pylist()):
            store.append(name, rows, commit_metadata=meta)
        else:
            store.upsert(name, rows, keys=["sample_id"], commit_metadata=meta)

    def known_ids(self) -> Container[str] | None:
        """sample_ids the output table held when this run was planned, as a container checked
        with ``in`` (None: unknown)."""
        return None

    # quarantine rows: one per (sample_id, content_digest, fingerprint) -----------------------
    def recorded_quarantine(self) -> dict[tuple[str, str | None], tuple[str, str]]:
        """(sample_id, content_digest) -> (check, reason) of the quarantine rows this row
        fingerprint already has (read once per run, like :meth:`done_keys`)."""
        store, name = self.ctx.store, self.table_name("__quarantine")
        if not store.exists(name):
            return {}
        t = store.read(
            name,
            columns=["sample_id", "content_digest", "check", "reason"],
            filter=[("fingerprint", "=", self.ctx.row_fingerprint)],
        )
        return {
            (s, d): (c, r)
            for s, d, c, r in zip(
                t["sample_id"].to_pylist(),
                t["content_digest"].to_pylist(),
                t["check"].to_pylist(),
                t["reason"].to_pylist(),
            )
        }

    @staticmethod
    def _new_quarantine(
        pending: list[dict[str, Any]],
        recorded: dict[tuple[str, str | None], tuple[str, str]],
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str | None]], int]:
        """The records of ``pending`` to write: not those already recorded with the same check
        and reason (a re-run after a crash between the quarantine commit and the sources record
        re-reads the items and gets them again), one per key. Also the recorded keys whose
        outcome changed (an edited file that still fails, differently): their old rows go.
        Returns (records to write, keys to delete first, how many were already recorded)."""
        fresh, replaced, seen, known = [], [], set(), 0
        for r in pending:
            key = (r["sample_id"], r.get("content_digest"))
            if key in seen:
                continue
            seen.add(key)
            old = recorded.get(key)
            if old == (r["check"], r["reason"]):
                known += 1
                continue
            if old is not None:
                replaced.append(key)
            fresh.append(r)
        return fresh, replaced, known

    def _quarantine_predicate(self, keys: list[tuple[str, str | None]]) -> str:
        """SQL matching this fingerprint's quarantine rows of ``keys``."""
        terms = [
            f"(sample_id = {_sql_str(s)} AND "
            + ("content_digest IS NULL)" if d is None else f"content_digest = {_sql_str(d)})")
            for s, d in keys
        ]
        return f"fingerprint = {_sql_str(self.ctx.row_fingerprint)} AND ({' OR '.join(terms)})"

    def filter_results(self, rows: pa.Table) -> tuple[pa.Table, int]:
        """Driver-side hook before commit: drop rows that need no write (returns the count)."""
        return rows, 0

    def record_items(self, items: list[str], row_ids: pa.ChunkedArray, *,
                     transient: frozenset[str] = frozenset()) -> None:
        """Driver-side hook after a chunk's commits: the work items it covered (their results
        are now in the output), the sample_ids of every row they produced, and the sample_ids
        quarantined for a reason that may pass on a retry (:data:`TRANSIENT_CHECKS`)."""

    def finalize(self) -> None:
        """Driver-side hook after the last chunk (e.g. delete samples whose source is gone)."""

    def _check_budget(self, counts: Counts, total: int) -> None:
        budget = self.ctx.error_budget
        example = getattr(self, "_budget_example", None)
        allowed = budget * max(total, 1)
        if counts.quarantined > allowed:
            q_uri = self.ctx.store.uri(self.table_name("__quarantine"))
            raise StageError(
                f"stage '{self.ctx.stage}': {counts.quarantined} of {total} samples quarantined, "
                f"over the DAG's error_budget {budget:g} ({int(allowed)} allowed). Reasons are in "
                f"the quarantine table {q_uri}; fix the inputs or raise error_budget."
                + (f" First: {example}" if example else "")
            )


class SourceStage(MapStage):
    """A per-sample stage that reads raw files (no upstream table) into a curated table with one
    row per ``sample_id`` (Delta MERGE). Subclasses implement ``list_items`` (driver side, cheap:
    a table of work items with at least ``sample_ids``, a list of the ids an item yields) and
    ``process_batch``. Rows identical to the stored ones are not rewritten (counted as skipped);
    samples whose source disappeared are deleted at the end.

    Incremental listing: when ``list_items`` also gives ``item_key`` (a stable name: the file's
    path) and ``item_stamp`` (everything the item's rows depend on that the listing can see:
    size and mtime, the label it gets, its annotation record), each committed item is recorded
    in ``<table>__sources`` with this row fingerprint and the ids it wrote. A re-run skips, without
    reading the file, every item whose stamp and fingerprint are unchanged and whose rows are all
    still in the table; so a re-run after 1% of the files changed decodes 1% of them.

    What the listing cannot see: a file rewritten with the same size and mtime (a backup
    restore, ``rsync -t``, a tool that keeps timestamps) keeps its stamp and is skipped. With
    ``ctx.verify_sources`` (``vgen run --verify-sources``, or ``verify_sources: true`` on the
    stage in the DAG) every listed item is read again, whatever its stamp, and each row is
    compared by its ``content_digest`` (blake2b over the sample's canonical bytes: pixels, masks,
    caption, annotation) with the row in the table: only rows whose digest differs are written,
    so exactly the samples whose content changed get a new table version and are recomputed
    downstream. The stored digest is the table's own ``content_digest`` column (nothing else is
    recorded, so a table written by any earlier run can be verified). Cost: a full read and
    decode of the dataset, across the actor pool like a first run; the verify mode is part of no
    fingerprint, so switching it on or off never invalidates rows."""

    warm_imports: ClassVar[tuple[str, ...]] = ()

    write_mode = "upsert"
    needs_range = (0, 0)
    #: every source kind names its data with ``root`` (a kind without that field checks none)
    root_fields = ("root",)

    def list_items(self) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def sources_table(self) -> str:
        return self.table_name("__sources")

    def sources_mode(self) -> str:
        """How this run decides a source item changed (shown by ``vgen plan``)."""
        return SOURCES_VERIFY if self.ctx.verify_sources else SOURCES_STAMP

    def plan_work(self) -> Work:
        items = self.list_items()
        listed = items["sample_ids"].to_pylist()
        store, name = self.ctx.store, self.table_name()
        stored = (
            store.read(name, columns=["sample_id", "content_digest"])
            if store.exists(name)
            else None
        )
        # sample_id -> content_digest of the stored rows: every per-batch check of the commit
        # loop (filter_results, _may_add) is a dict lookup per row, never a pass over the table
        self._existing_ids: dict[str, str] = (
            dict(zip(stored["sample_id"].to_pylist(), stored["content_digest"].to_pylist()))
            if stored is not None else {}
        )
        del stored
        existing_ids = self._existing_ids
        n_ids = sum(len(g) for g in listed)
        self._removed = sorted(existing_ids.keys() - {i for g in listed for i in g})
        self._item_ids: dict[str, list[str]] = {}
        self._stamps: dict[str, str] = {}
        self._unlisted: list[str] = []
        self._recorded: dict[str, tuple[str, list[str]]] = {}
        skipped = stamp_changed = 0
        if "item_key" in items.column_names:
            keys = items["item_key"].to_pylist()
            stamps = items["item_stamp"].to_pylist()
            self._item_ids = dict(zip(keys, listed))
            self._stamps = dict(zip(keys, stamps))
            done = self._recorded_items()
            self._recorded = dict(done)
            keep = []
            for key, stamp, group in zip(keys, stamps, listed):
                rec = done.pop(key, None)
                if rec is not None and rec[0] == stamp and all(r in existing_ids for r in rec[1]):
                    skipped += len(group)
                    keep.append(False)
                else:
                    stamp_changed += len(group)
                    keep.append(True)
            self._unlisted = sorted(done)  # recorded items no longer listed
            if not self.ctx.verify_sources:
                items = items.filter(pa.array(keep, pa.bool_()))
        else:
            stamp_changed = n_ids
        if self.ctx.verify_sources:  # everything is read; unchanged rows are not written
            return Work(
                total=n_ids,
                skipped=0,
                items=items.drop_columns(["sample_ids"]),
                breakdown={"verify": n_ids - stamp_changed, "new_or_changed": stamp_changed},
            )
        return Work(
            total=n_ids,
            skipped=skipped,
            items=items.drop_columns(["sample_ids"]),
            breakdown={"new_or_changed": stamp_changed},
        )

    def _recorded_items(self) -> dict[str, tuple[str, list[str]]]:
        """item_key -> (stamp, row ids) of the items recorded with this row fingerprint."""
        store, name = self.ctx.store, self.sources_table()
        if not store.exists(name):
            return {}
        t = store.read(name, filter=[("fingerprint", "=", self.ctx.row_fingerprint)])
        out: dict[str, tuple[str, list[str]]] = {}
        t = t.sort_by([("recorded_at", "ascending")])
        for key, stamp, rows in zip(
            t["item_key"].to_pylist(), t["item_stamp"].to_pylist(), t["rows"].to_pylist()
        ):
            out[key] = (stamp, rows)  # the latest record of a key wins
        return out

    def safe_process(self, batch: pa.Table) -> BatchResult:
        result = super().safe_process(batch)
        if "item_key" in batch.column_names:
            result.items = batch["item_key"].to_pylist()
        return result

    def record_items(self, items: list[str], row_ids: pa.ChunkedArray, *,
                     transient: frozenset[str] = frozenset()) -> None:
        if not items or not self._item_ids:
            return
        store, name = self.ctx.store, self.sources_table()
        store.create(name, SOURCE_ITEMS)
        produced = set(row_ids.to_pylist())
        if transient:  # read again next run: no record, and its rows stay until then
            items = [k for k in items if not transient.intersection(self._item_ids.get(k, []))]
        self._delete_stale(items, produced)
        now = dt.datetime.now(dt.timezone.utc)
        fp = self.ctx.row_fingerprint
        recorded = getattr(self, "_recorded", {})
        recs = []
        for k in items:
            rows = [i for i in self._item_ids.get(k, []) if i in produced]
            if recorded.get(k) == (self._stamps[k], rows):
                continue  # re-read (verified, or its rows were gone) and recorded as it is
            recs.append(
                {
                    "item_key": k,
                    "item_stamp": self._stamps[k],
                    "fingerprint": fp,
                    "rows": rows,
                    "recorded_at": now,
                }
            )
        if recs:
            store.append(
                name,
                pa.Table.from_pylist(recs, schema=SOURCE_ITEMS),
                commit_metadata={"vgen.stage": self.ctx.stage},
            )

    def _delete_stale(self, items: list[str], produced: set[str]) -> None:
        """Rows in the table of samples these re-read items no longer produce: a file that
        decoded before and is broken now (its samples are quarantined), or that now gives fewer
        samples. A fresh run would have none of them, so they go before the items are recorded
        (a crash in between re-reads the items and deletes them again)."""
        existing: dict[str, str] = getattr(self, "_existing_ids", {})
        stale = sorted({i for k in items for i in self._item_ids.get(k, [])
                        if i not in produced and i in existing})
        meta = {"vgen.stage": self.ctx.stage}
        for i in range(0, len(stale), DELETE_BATCH):
            values = ", ".join(_sql_str(k) for k in stale[i : i + DELETE_BATCH])
            fault_point("before_stale_delete")
            self.ctx.store.delete(self.table_name(), f"sample_id IN ({values})",
                                  commit_metadata=meta)
        for sid in stale:
            existing.pop(sid, None)

    def known_ids(self) -> Container[str] | None:
        return getattr(self, "_existing_ids", {})

    def filter_results(self, rows: pa.Table) -> tuple[pa.Table, int]:
        existing: dict[str, str] = getattr(self, "_existing_ids", {})
        if not existing or not rows.num_rows:
            return rows, 0
        same = [existing.get(i) == d for i, d in zip(rows["sample_id"].to_pylist(),
                                                      rows["content_digest"].to_pylist())]
        if not any(same):
            return rows, 0
        kept = rows.filter(pc.invert(pa.array(same, pa.bool_())))
        return kept, rows.num_rows - kept.num_rows

    def finalize(self) -> None:
        """Delete the rows of samples no longer listed, then the records of items no longer
        listed (a file that comes back is read again), ``DELETE_BATCH`` keys per commit so
        100k removed ids never build one giant predicate."""
        meta = {"vgen.stage": self.ctx.stage}
        for column, name, keys in (
            ("sample_id", self.table_name(), getattr(self, "_removed", [])),
            ("item_key", self.sources_table(), getattr(self, "_unlisted", [])),
        ):
            for i in range(0, len(keys), DELETE_BATCH):
                values = ", ".join(_sql_str(k) for k in keys[i : i + DELETE_BATCH])
                fault_point("before_source_delete")
                self.ctx.store.delete(name, f"{column} IN ({values})", commit_metadata=meta)


def _sql_str(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


class InProcessExecutor:
    """Runs a per-sample stage, or a job stage's actor work (:meth:`map_actors`), in this
    process: the unit-test twin of the Ray executor."""

    def __init__(self, batch_size: int | None = None):
        self.batch_size = batch_size

    def map_actors(
        self,
        actor_cls: type,
        args: tuple,
        *,
        make_ds: Callable[[], Any],
        local_batches: Callable[[], Iterator[pa.Table]],
        batch_size: int,
        resources: Any = None,
        num_batches: int | None = None,
    ) -> Iterator[pa.Table]:
        """The in-process twin of ``RayDataExecutor.map_actors``: one ``actor_cls(*args)`` in
        this process over ``local_batches()`` (``make_ds`` is not called: no Ray)."""
        actor = actor_cls(*args)
        for batch in local_batches():
            yield actor(batch)

    def execute(self, stage: MapStage, work: Work) -> Iterator[BatchResult]:
        stage.setup()
        size = self.batch_size or getattr(stage.ctx.resources, "batch_size", 16) or 16
        for batch in iter_work_batches(stage.ctx.store, work, size):
            yield stage.safe_process(batch)


#: rows per scan batch when a stage's to-do is filtered out of its input table
SCAN_BATCH = 65536


def iter_work_batches(store: Any, work: Work, size: int) -> Iterable[pa.Table]:
    """The rows a per-sample stage must process, in batches of ``size`` (driver-side reading,
    streamed from the Delta table: memory does not grow with the table)."""
    if work.items is not None:
        for batch in work.items.to_batches(max_chunksize=size):
            yield pa.Table.from_batches([batch])
        return
    wanted = row_keys(work.todo) if work.todo is not None and work.todo_count < work.total else None
    pending: list[pa.Table] = []
    n = 0
    # filtering: scan in large batches (one set lookup per scan batch), then re-chunk to size
    scan = size if wanted is None else max(size, SCAN_BATCH)
    for batch in store.iter_batches(
        work.table_name, version=work.table_version, columns=work.columns, batch_size=scan
    ):
        t = pa.Table.from_batches([batch])
        if wanted is not None:
            t = filter_to_key_set(t, wanted)
        if not t.num_rows:
            continue
        pending.append(t)
        n += t.num_rows
        while n >= size:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, size)
            rest = whole.slice(size)
            pending, n = ([rest] if rest.num_rows else []), rest.num_rows
    if n:
        yield pa.concat_tables(pending)


def row_keys(table: pa.Table) -> pa.ChunkedArray:
    """One ``sample_id \x1f content_digest`` string per row: the key side tables are joined on."""
    return pc.binary_join_element_wise(table["sample_id"], table["content_digest"], "\x1f")


def filter_to_key_set(table: pa.Table, wanted: Any) -> pa.Table:
    """Rows of ``table`` whose key (:func:`row_keys`) is in ``wanted`` (built once by the
    caller)."""
    return table.filter(pc.is_in(row_keys(table), value_set=wanted))


def filter_to_keys(table: pa.Table, keys: pa.Table | None) -> pa.Table:
    """Rows of ``table`` whose (sample_id, content_digest) is in ``keys``."""
    if keys is None:
        return table
    return filter_to_key_set(table, row_keys(keys))


#: set while the driver runs a stage's work in-process in place of a Ray actor that asks for no
#: GPU (:func:`cpu_only`): ``device: auto`` then resolves to the CPU, as it would in that actor
#: (Ray hides the GPUs from it), so the rows and their fingerprint do not depend on where the
#: work ran
_CPU_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("vgen_cpu_only", default=False)


@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """``device: auto`` resolves to the CPU inside this block (this thread only)."""
    token = _CPU_ONLY.set(True)
    try:
        yield
    finally:
        try:
            _CPU_ONLY.reset(token)
        except ValueError:  # closed from another context (a generator collected elsewhere)
            _CPU_ONLY.set(False)


def resolve_device(want: str):
    """``auto`` | ``cpu`` | ``cuda`` -> a torch.device (auto: CUDA when this worker has one and
    is not standing in for a CPU actor: :func:`cpu_only`)."""
    import torch

    if want == "cuda" or (want == "auto" and not _CPU_ONLY.get() and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
