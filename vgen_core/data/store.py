"""The table store: Delta Lake tables and raw files under one storage root.

A storage root is a local directory or ``s3://bucket/prefix``. Under it::

    <root>/tables/<name>/      one Delta table per name (names may nest: ``demo/tokens``)
    <root>/_vgen/              vgen's own small files (write probes, ...)
    <root>/<anything else>     raw files, reached through :attr:`TableStore.fs` / :meth:`path`

Every write (:meth:`~TableStore.append`, :meth:`~TableStore.upsert`, :meth:`~TableStore.delete`)
is one atomic Delta commit and returns the table version it produced, so a stage can record
exactly what it wrote and a training run exactly what it read (``read(name, version=v)``).
Caller metadata (``commit_metadata``) is stored in the commit and comes back from
:meth:`~TableStore.versions`; by convention keys are namespaced (``vgen.stage``,
``vgen.fingerprint``, ...). The ``vgen.*`` entries of an input table's Arrow schema metadata
(``vgen.schema``, ``vgen.schema_version``, see :mod:`vgen_core.data.schemas`) are recorded in
each commit too, because Delta does not keep Arrow schema metadata.

Types. Delta has no unsigned integers: ``uint8`` is stored as ``int8``, ``uint16`` as ``int16``,
and so on, and values that do not fit are refused (never wrapped). ``large_string`` /
``string_view`` are stored as ``string``. :meth:`~TableStore.read` returns the table's own
Arrow types (``string``, ``binary``, ...), never view types.

Concurrency. Writers on any number of machines may commit to the same table: Delta's optimistic
concurrency makes a losing writer re-check and retry (blind appends never conflict; a MERGE or
DELETE that touched the same files is re-run from the new snapshot, up to a few times).
On S3 this needs conditional writes (``If-None-Match``), which delta-rs 1.x uses by default and
AWS S3, MinIO, R2 and moto support; no DynamoDB lock and no ``AWS_S3_ALLOW_UNSAFE_RENAME``.

S3 configuration comes from the standard AWS environment (``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), overridden by ``storage_options``
(delta-rs / object_store keys, e.g. ``{"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}``).
An ``http://`` endpoint turns on ``AWS_ALLOW_HTTP``. The resolved options are
:attr:`TableStore.storage_options`, for this process's own reads and writes. Anything that runs
elsewhere gets :meth:`TableStore.worker_storage_options` instead (pass those to
``ray.data.read_delta`` and friends, whose read tasks pickle their options): the endpoint,
region and other settings, never access keys, secrets or session tokens, which each worker takes
from its own environment or instance role. A pickled store likewise carries only its root and
explicit options and re-reads the environment where it is unpickled, so credentials from a
driver's environment are not shipped to workers.

Reads go through delta-rs's own engine (DataFusion), not through ``DeltaTable.to_pyarrow_table``,
whose default Python file system (Arrow I/O threads calling back into Python and Rust) makes the
interpreter abort at exit ("terminate called without an active exception") after tables were
written from several threads (deltalake 1.6.6, reproducible on this project's test machine).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, QueryBuilder, write_deltalake
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from vgen_core.faults import fault_point

__all__ = ["StorageError", "TableStore"]

_T = TypeVar("_T")

_NAME_RE = re.compile(r"^[A-Za-z0-9_./-]+$")

#: Commit-info keys Delta / delta-rs write themselves: not accepted as caller metadata and not
#: returned as such by :meth:`TableStore.versions`.
_RESERVED_COMMIT_KEYS = frozenset(
    {
        "timestamp",
        "operation",
        "operationParameters",
        "operationMetrics",
        "engineInfo",
        "clientVersion",
        "version",
        "readVersion",
        "isolationLevel",
        "isBlindAppend",
        "userId",
        "userName",
        "userMetadata",
        "job",
        "notebook",
        "clusterId",
        "txnId",
        "inCommitTimestamp",
    }
)

#: How many times a write that lost a commit race is re-run from a fresh snapshot (on top of the
#: retries delta-rs does itself for conflict-free commits such as blind appends).
_COMMIT_ATTEMPTS = 5


class StorageError(RuntimeError):
    """A table or storage-root operation failed; the message says which table / root and why."""


def _is_secret_option(key: str) -> bool:
    """A storage option that is a credential (AWS_SECRET_ACCESS_KEY, aws_session_token,
    azure_storage_account_key, google_service_account_key, sas tokens, ...)."""
    from vgen_core.tracking.redact import is_secret_key

    k = key.lower()
    if k.endswith("skip_signature"):  # a switch (anonymous access), not a credential
        return False
    return is_secret_key(k) or "access_key" in k or k.endswith(("_key_id", "service_account"))


def _truthy(v: str | None) -> bool:
    return str(v).strip().lower() in {"1", "true", "yes", "on"}


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"filter value must be finite, got {value!r}")
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (bytes, bytearray)):
        return "X'" + bytes(value).hex() + "'"
    raise TypeError(
        f"unsupported filter value {value!r} ({type(value).__name__}); use str, int, float, "
        "bool, bytes or None"
    )


_OPS = {"=": "=", "==": "=", "!=": "<>", "<>": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _filter_to_sql(filters: Sequence[Any], columns: set[str]) -> str:
    """pyarrow-style filters -> SQL. A flat list of (col, op, value) is AND-ed; a list of such
    lists is OR-ed (disjunctive normal form)."""
    if not filters:
        return ""
    if all(isinstance(f, tuple) for f in filters):
        groups = [list(filters)]
    elif all(isinstance(f, (list, tuple)) and all(isinstance(t, tuple) for t in f)
             for f in filters):
        groups = [list(f) for f in filters]
    else:
        raise ValueError(
            "filter must be a list of (column, op, value) tuples, or a list of such lists"
        )
    ors = []
    for group in groups:
        ands = []
        for term in group:
            if len(term) != 3:
                raise ValueError(f"filter term must be (column, op, value), got {term!r}")
            col, op, value = term
            if col not in columns:
                raise ValueError(f"filter names unknown column {col!r}; columns: {sorted(columns)}")
            q = _quote_ident(col)
            op_l = str(op).strip().lower()
            if op_l in ("in", "not in"):
                values = list(value)
                if not values:
                    ands.append("false" if op_l == "in" else "true")
                    continue
                nulls = [v for v in values if v is None]
                lits = ", ".join(_sql_literal(v) for v in values if v is not None)
                if op_l == "in":
                    parts = ([f"{q} IN ({lits})"] if lits else []) + (
                        [f"{q} IS NULL"] if nulls else []
                    )
                    ands.append("(" + " OR ".join(parts) + ")")
                else:
                    parts = ([f"{q} NOT IN ({lits})"] if lits else []) + (
                        [f"{q} IS NOT NULL"] if nulls else []
                    )
                    ands.append("(" + " AND ".join(parts) + ")")
            elif op_l in _OPS:
                if value is None:
                    if _OPS[op_l] == "=":
                        ands.append(f"{q} IS NULL")
                    elif _OPS[op_l] == "<>":
                        ands.append(f"{q} IS NOT NULL")
                    else:
                        raise ValueError(f"cannot compare {col!r} {op} None")
                else:
                    ands.append(f"{q} {_OPS[op_l]} {_sql_literal(value)}")
            else:
                raise ValueError(
                    f"unsupported filter op {op!r}; use one of {sorted(_OPS)}, in, not in"
                )
        ors.append("(" + " AND ".join(ands) + ")")
    return " WHERE " + " OR ".join(ors)


class TableStore:
    """Delta tables and raw files under one storage root (local path or ``s3://bucket/prefix``).

    >>> store = TableStore("/tmp/vgen-demo")            # doctest: +SKIP
    >>> v = store.append("demo/tokens", table, commit_metadata={"vgen.stage": "tokens"})
    >>> store.read("demo/tokens", version=v)
    """

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, str] | None = None):
        root = os.fspath(root)
        if not isinstance(root, str) or not root:
            raise StorageError(f"storage root must be a non-empty path or s3:// URI, got {root!r}")
        self._explicit_options: dict[str, str] = {
            str(k): str(v) for k, v in (storage_options or {}).items()
        }
        if root.startswith(("s3://", "s3a://")):
            rest = root.split("://", 1)[1].strip("/")
            if not rest or rest.startswith("/"):
                raise StorageError(f"storage root {root!r} names no bucket")
            self.scheme = "s3"
            self.root = "s3://" + rest
            self.bucket: str | None = rest.split("/", 1)[0]
        elif root.startswith("file://"):
            self.scheme = "file"
            self.root = os.path.abspath(os.path.expanduser(root[len("file://") :]))
            self.bucket = None
        elif "://" in root:
            raise StorageError(
                f"unsupported storage root {root!r}: use a local path or s3://bucket/prefix"
            )
        else:
            self.scheme = "file"
            self.root = os.path.abspath(os.path.expanduser(root))
            self.bucket = None
        self.storage_options: dict[str, str] = self._resolve_options()
        self._fs: fsspec.AbstractFileSystem | None = None

    # ----------------------------------------------------------------------------------------
    # configuration
    # ----------------------------------------------------------------------------------------

    def _resolve_options(self) -> dict[str, str]:
        """Delta (object_store) options: AWS environment first, explicit options over it."""
        if self.scheme != "s3":
            return dict(self._explicit_options)
        env = os.environ
        opts: dict[str, str] = {}
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["AWS_ENDPOINT_URL"] = endpoint
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            opts["AWS_REGION"] = region
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            if env.get(key):
                opts[key] = env[key]
        for k, v in self._explicit_options.items():
            opts[k.upper() if k.lower().startswith("aws_") else k] = v
        ep = opts.get("AWS_ENDPOINT_URL") or opts.get("AWS_ENDPOINT_URL_S3") or ""
        if ep.lower().startswith("http://") and "AWS_ALLOW_HTTP" not in opts:
            opts["AWS_ALLOW_HTTP"] = "true"
        if ep and "AWS_REGION" not in opts:
            opts["AWS_REGION"] = "us-east-1"  # S3-compatible servers ignore it; SigV4 needs one
        return opts

    def worker_storage_options(self) -> dict[str, str]:
        """:attr:`storage_options` without credentials, for work that runs on other processes
        or nodes (``ray.data.read_delta(..., storage_options=store.worker_storage_options())``).

        Endpoint, region, ``AWS_ALLOW_HTTP``, timeouts and the like are kept; access key ids,
        secret keys, session tokens and other credentials are dropped: Ray Data pickles the
        options into every read task, and a worker takes credentials from its own environment
        or instance role (``docs/scaling.md``, "S3 storage"). Empty for a local root without
        explicit options.
        """
        return {k: v for k, v in self.storage_options.items() if not _is_secret_option(k)}

    def _s3fs_kwargs(self) -> dict[str, Any]:
        o = self.storage_options
        kw: dict[str, Any] = {}
        ep = o.get("AWS_ENDPOINT_URL") or o.get("AWS_ENDPOINT_URL_S3")
        if ep:
            kw["endpoint_url"] = ep
        if o.get("AWS_ACCESS_KEY_ID"):
            kw["key"] = o["AWS_ACCESS_KEY_ID"]
        if o.get("AWS_SECRET_ACCESS_KEY"):
            kw["secret"] = o["AWS_SECRET_ACCESS_KEY"]
        if o.get("AWS_SESSION_TOKEN"):
            kw["token"] = o["AWS_SESSION_TOKEN"]
        if _truthy(o.get("AWS_SKIP_SIGNATURE")):
            kw["anon"] = True
        if o.get("AWS_REGION"):
            kw["client_kwargs"] = {"region_name": o["AWS_REGION"]}
        return kw

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "storage_options": self._explicit_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["storage_options"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"TableStore({self.root!r})"

    # ----------------------------------------------------------------------------------------
    # raw files
    # ----------------------------------------------------------------------------------------

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """fsspec file system of the root (``s3fs`` for S3, configured like the tables)."""
        if self._fs is None:
            if self.scheme == "s3":
                import s3fs

                self._fs = s3fs.S3FileSystem(**self._s3fs_kwargs())
            else:
                self._fs = fsspec.filesystem("file")
        return self._fs

    def path(self, *parts: str) -> str:
        """Path (local) or URI (``s3://``) of a raw file under the root; ``path()`` is the root."""
        segs: list[str] = []
        for p in parts:
            for s in str(p).split("/"):
                if s in ("", "."):
                    continue
                if s == "..":
                    raise ValueError(f"path parts must not contain '..': {parts!r}")
                segs.append(s)
        return "/".join([self.root, *segs]) if segs else self.root

    def check_writable(self) -> None:
        """Create and delete ``<root>/_vgen/probe-<uuid>``; :class:`StorageError` if that fails.

        On S3 the probe uses short connect/read timeouts and a single attempt, so an unreachable
        endpoint fails in seconds rather than after minutes of retries.
        """
        probe = self.path("_vgen", f"probe-{uuid.uuid4().hex}")
        try:
            if self.scheme == "s3":
                import s3fs

                kw = self._s3fs_kwargs()
                kw["config_kwargs"] = {
                    "connect_timeout": 3,
                    "read_timeout": 10,
                    "retries": {"max_attempts": 1, "mode": "standard"},
                }
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **kw)
                fs.retries = 1  # s3fs's own retry loop (a class attribute, 5 by default)
                fs.pipe_file(probe, b"vgen write probe\n")
                fs.rm_file(probe)
            else:
                fs = self.fs
                fs.makedirs(self.path("_vgen"), exist_ok=True)
                fs.pipe_file(probe, b"vgen write probe\n")
                fs.rm_file(probe)
        except Exception as e:
            cause = f"{type(e).__name__}: {e}"
            raise StorageError(
                f"storage root {self.root} is not writable: {cause}. Check the path/bucket and "
                "credentials, or pass --storage (or set VGEN_STORAGE) to use another root."
            ) from e

    # ----------------------------------------------------------------------------------------
    # tables: naming and opening
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> str:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"table name must match [a-zA-Z0-9_./-]+, got {name!r}")
        segs = name.split("/")
        if any(s in ("", ".", "..") for s in segs):
            raise ValueError(f"table name must not have empty, '.' or '..' segments: {name!r}")
        return name

    def uri(self, name: str) -> str:
        """``<root>/tables/<name>``."""
        return f"{self.root}/tables/{self._check_name(name)}"

    def _open(self, name: str, version: int | None = None) -> DeltaTable:
        uri = self.uri(name)
        try:
            dt = DeltaTable(uri, storage_options=self.storage_options or None)
        except TableNotFoundError as e:
            raise StorageError(f"table {name!r} not found at {uri}") from e
        except (DeltaError, OSError) as e:
            raise StorageError(f"cannot open table {name!r} at {uri}: {e}") from e
        if version is not None:
            latest = dt.version()
            if (
                isinstance(version, bool)
                or not isinstance(version, int)
                or not 0 <= version <= latest
            ):
                raise StorageError(
                    f"table {name!r} at {uri} has no version {version!r} (versions 0..{latest})"
                )
            try:
                dt.load_as_version(version)
            except (DeltaError, OSError) as e:
                raise StorageError(
                    f"cannot load version {version} of table {name!r} at {uri}: {e}"
                ) from e
        return dt

    def exists(self, name: str) -> bool:
        """Whether a Delta table exists at :meth:`uri`."""
        # Not DeltaTable.is_deltatable: in deltalake 1.6 it holds the GIL during its S3 requests,
        # which stalls every other Python thread (and deadlocks an in-process S3 server).
        uri = self.uri(name)
        try:
            DeltaTable(uri, storage_options=self.storage_options or None)
            return True
        except TableNotFoundError:
            return False
        except (DeltaError, OSError) as e:
            raise StorageError(f"cannot check table {name!r} at {uri}: {e}") from e

    def list_tables(self, prefix: str) -> list[str]:
        """Names of the Delta tables directly under ``<prefix>/`` (one level), sorted."""
        base = f"{self.root}/tables/{self._check_name(prefix)}"
        fs = self.fs
        path = base.split("://", 1)[1] if "://" in base else base
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            if e.get("type") != "directory":
                continue
            child = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if fs.exists(f"{e['name'].rstrip('/')}/_delta_log"):
                names.append(f"{prefix}/{child}")
        return sorted(names)

    def description(self, name: str) -> str | None:
        """The table's description (set at creation; vgen side tables keep their preprocessing
        JSON there, which outlives the commit log)."""
        return self._open(name).metadata().description

    def version(self, name: str) -> int | None:
        """Latest version of the table, or None when it does not exist."""
        uri = self.uri(name)
        try:
            return DeltaTable(uri, storage_options=self.storage_options or None).version()
        except TableNotFoundError:
            return None
        except (DeltaError, OSError) as e:
            raise StorageError(f"cannot open table {name!r} at {uri}: {e}") from e

    def schema(self, name: str) -> pa.Schema:
        """Arrow schema of the table (as :meth:`read` returns it)."""
        return _arrow_schema(self._open(name))

    # ----------------------------------------------------------------------------------------
    # tables: writes
    # ----------------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        schema: pa.Schema,
        *,
        partition_by: list[str] | None = None,
        description: str | None = None,
    ) -> int:
        """Create an empty table; if it exists with a compatible schema, return its version.

        Compatible means the same columns with the same Delta types and nullability (order and
        Arrow-only differences such as ``large_string`` vs ``string`` do not matter) and, when
        ``partition_by`` is given, the same partition columns. Otherwise :class:`StorageError`.
        """
        uri = self.uri(name)
        wanted = _delta_schema(schema, f"table {name!r}")
        parts = list(partition_by or [])
        missing = [p for p in parts if p not in schema.names]
        if missing:
            raise ValueError(f"partition_by names columns not in the schema: {missing}")
        if not self.exists(name):
            meta = _schema_commit_meta(schema)
            try:
                dt = DeltaTable.create(
                    uri,
                    wanted,
                    mode="error",
                    partition_by=parts or None,
                    description=description,
                    storage_options=self.storage_options or None,
                    commit_properties=CommitProperties(custom_metadata=meta) if meta else None,
                )
                return dt.version()
            except Exception as e:
                if not self.exists(name):
                    raise StorageError(f"cannot create table {name!r} at {uri}: {e}") from e
        dt = self._open(name)
        self._check_compatible(name, dt, wanted, parts if partition_by is not None else None)
        return dt.version()

    def _check_compatible(
        self, name: str, dt: DeltaTable, wanted: DeltaSchema, partition_by: list[str] | None
    ) -> None:
        found = {f.name: f for f in dt.schema().fields}
        want = {f.name: f for f in wanted.fields}
        want_pa, found_pa = pa.schema(wanted.to_arrow()), _arrow_schema(dt)
        problems = []
        for n in [n for n in want_pa.names if n not in found]:
            problems.append(f"the table lacks column {n!r}")
        for n in [n for n in found_pa.names if n not in want]:
            problems.append(f"the table has unexpected column {n!r}")
        for n in [n for n in want_pa.names if n in found]:
            if _field_sig(want[n]) != _field_sig(found[n]):
                problems.append(
                    f"column {n!r} is {_field_desc(found_pa.field(n))}, "
                    f"expected {_field_desc(want_pa.field(n))}"
                )
        if partition_by is not None:
            have = list(dt.metadata().partition_columns)
            if have != partition_by:
                problems.append(f"the table is partitioned by {have}, expected {partition_by}")
        if problems:
            raise StorageError(
                f"table {name!r} at {self.uri(name)} exists with an incompatible schema: "
                + "; ".join(problems)
                + f". Expected fields: [{', '.join(_field_desc(f) for f in want_pa)}]; "
                f"found fields: [{', '.join(_field_desc(f) for f in found_pa)}]"
            )

    def append(
        self, name: str, table: pa.Table, *, commit_metadata: dict[str, str] | None = None
    ) -> int:
        """Append rows in one atomic commit; returns the new version.

        The input is cast to the table's schema (columns matched by name, any order); missing or
        extra columns, values that do not fit, or nulls in non-null columns raise
        :class:`StorageError`. A missing table is created from the input's schema by this same
        commit. An empty input makes no commit (except to create a missing table).
        """
        table = _as_table(table)
        meta = _commit_meta(commit_metadata, table.schema)
        uri = self.uri(name)

        def attempt() -> int:
            if not self.exists(name):
                data = _cast_for_new_table(table, name)
                try:
                    write_deltalake(
                        uri,
                        data,
                        mode="error",
                        storage_options=self.storage_options or None,
                        commit_properties=CommitProperties(custom_metadata=meta) if meta else None,
                    )
                    return 0  # creating a table writes its version 0, with these rows
                except Exception as e:
                    if not self.exists(name):
                        raise StorageError(f"cannot create table {name!r} at {uri}: {e}") from e
                    # another writer created it meanwhile: append to it below
            dt = self._open(name)
            data = _cast_to_table(table, _arrow_schema(dt), name, uri)
            if data.num_rows == 0:
                return dt.version()
            write_deltalake(
                dt,
                data,
                mode="append",
                commit_properties=CommitProperties(custom_metadata=meta) if meta else None,
            )
            return dt.version()

        return self._with_retries(f"append to table {name!r} at {uri}", attempt)

    def compact(self, name: str, *, min_files: int = 64) -> bool:
        """Rewrite the table's data files into a few (Delta OPTIMIZE compaction) once it has at
        least ``min_files`` of them; returns whether it did. An append-only table written a
        few rows a commit (`pipelines.dag.state`'s stage records) otherwise reads slower with
        every commit: one small file each, 0.67 s to read at 1,000 (measured, local disk). Rows
        and history are unchanged (older versions still read their own files, until a VACUUM).
        A missing table is not compacted. One commit, no retry: a writer that commits meanwhile
        makes it fail (raises :class:`StorageError`; compact again later)."""
        try:
            dt = self._open(name)
        except StorageError:
            if not self.exists(name):  # nothing written yet: nothing to compact
                return False
            raise
        if len(dt.file_uris()) < min_files:
            return False
        try:
            dt.optimize.compact(
                commit_properties=CommitProperties(custom_metadata={"vgen.op": "compact"}))
        except Exception as e:
            raise StorageError(f"compacting table {name!r} at {self.uri(name)} failed: {e}") from e
        return True

    def upsert(
        self,
        name: str,
        table: pa.Table,
        keys: list[str],
        *,
        commit_metadata: dict[str, str] | None = None,
    ) -> int:
        """MERGE rows by ``keys`` in one commit: matching rows are replaced, others inserted.

        Keys must be non-null and unique within the input. A missing table is created from the
        input (all rows inserted). Returns the new version.
        """
        table = _as_table(table)
        keys = list(keys)
        if not keys:
            raise ValueError("upsert needs at least one key column")
        uri = self.uri(name)
        missing = [k for k in keys if k not in table.column_names]
        if missing:
            raise StorageError(
                f"upsert into table {name!r}: key columns {missing} are not in the input"
            )
        for k in keys:
            n = table.column(k).null_count
            if n:
                raise StorageError(
                    f"upsert into table {name!r}: key column {k!r} has {n} null value(s)"
                )
        if table.num_rows:
            counts = table.group_by(keys).aggregate([([], "count_all")])
            dup = counts.filter(pc.greater(counts["count_all"], 1))
            if dup.num_rows:
                example = {k: dup.column(k)[0].as_py() for k in keys}
                raise StorageError(
                    f"upsert into table {name!r}: {dup.num_rows} key(s) appear more than once in "
                    f"the input, e.g. {example}"
                )
        if not self.exists(name):
            return self.append(name, table, commit_metadata=commit_metadata)
        meta = _commit_meta(commit_metadata, table.schema)
        predicate = " AND ".join(
            f"target.{_quote_ident(k)} = source.{_quote_ident(k)}" for k in keys
        )

        def attempt() -> int:
            dt = self._open(name)
            data = _cast_to_table(table, _arrow_schema(dt), name, uri)
            if data.num_rows == 0:
                return dt.version()
            (
                dt.merge(
                    data,
                    predicate=predicate,
                    source_alias="source",
                    target_alias="target",
                    commit_properties=CommitProperties(custom_metadata=meta) if meta else None,
                )
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
            return dt.version()

        return self._with_retries(f"upsert into table {name!r} at {uri}", attempt)

    def delete(
        self, name: str, predicate: str, *, commit_metadata: dict[str, str] | None = None
    ) -> int:
        """Delete the rows matching a SQL ``predicate`` (e.g. ``"fingerprint <> 'abc'"``).

        Returns the new version, or the current one when no row matched (no commit is made).
        """
        if not isinstance(predicate, str) or not predicate.strip():
            raise ValueError("delete needs a non-empty SQL predicate (there is no delete-all)")
        meta = _commit_meta(commit_metadata, None)
        uri = self.uri(name)

        def attempt() -> int:
            dt = self._open(name)
            dt.delete(
                predicate,
                commit_properties=CommitProperties(custom_metadata=meta) if meta else None,
            )
            return dt.version()

        return self._with_retries(f"delete from table {name!r} at {uri}", attempt)

    # ----------------------------------------------------------------------------------------
    # tables: data files written by workers, committed by the driver
    # ----------------------------------------------------------------------------------------

    def write_data_file(self, name: str, table: pa.Table, *, file_id: str) -> dict[str, Any]:
        """Worker side of a two-phase append: write ``table`` (cast to the table's schema) as one
        Parquet data file in the table's folder, not yet part of any version, and return its
        add record (``path`` relative to the table, ``size``, ``modification_time``, ``stats``,
        ``num_rows``: a few hundred bytes) for :meth:`commit_data_files` on the driver.

        The file is ``vgen-<file_id>.snappy.parquet``: the caller derives ``file_id`` from what
        the file holds (the rows' keys), so a retried task rewrites the same file instead of
        adding another. The bytes land whole or not at all (a local file is written aside and
        renamed; an S3 PUT is atomic). A file never committed (a run killed in between) is
        invisible to readers; ``vgen gc`` (vacuum) removes it.
        """
        import pyarrow.parquet as pq

        if not re.fullmatch(r"[A-Za-z0-9_-]{8,128}", file_id):
            raise ValueError(f"file_id must be 8-128 letters, digits, '_' or '-', got {file_id!r}")
        uri = self.uri(name)
        data = _cast_to_table(_as_table(table), self._file_schema(name), name, uri)
        sink = pa.BufferOutputStream()
        pq.write_table(data, sink, compression="snappy")
        body = sink.getvalue().to_pybytes()
        rel = f"vgen-{file_id}.snappy.parquet"
        target = f"{uri}/{rel}"
        try:
            if self.scheme == "file":
                tmp = f"{uri}/.{rel}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    f.write(body)
                os.replace(tmp, target)
            else:
                self.fs.pipe_file(target, body)
        except OSError as e:
            raise StorageError(f"cannot write a data file of table {name!r} to {target}: {e}"
                               ) from e
        return {"path": rel, "size": len(body), "num_rows": data.num_rows,
                "modification_time": int(time.time() * 1000), "stats": _file_stats(data)}

    def _file_schema(self, name: str) -> pa.Schema:
        """The table's Arrow schema, read once per store object (workers write many files)."""
        cache = self.__dict__.setdefault("_schemas", {})
        if name not in cache:
            cache[name] = _arrow_schema(self._open(name))
        return cache[name]

    def commit_data_files(self, name: str, files: Sequence[dict[str, Any]], *,
                          commit_metadata: dict[str, str] | None = None) -> int:
        """Driver side: add the data files workers wrote (:meth:`write_data_file` records) to
        the table in one atomic append commit; returns the new version. Only metadata passes
        through here, never the rows. A path given twice is added once; no files, no commit."""
        from deltalake.transaction import AddAction

        meta = _commit_meta(commit_metadata, None)
        uri = self.uri(name)
        unique: dict[str, dict[str, Any]] = {}
        for f in files:
            unique.setdefault(f["path"], f)
        actions: list[Any] = [AddAction(path=f["path"], size=int(f["size"]), partition_values={},
                             modification_time=int(f["modification_time"]), data_change=True,
                             stats=f["stats"]) for f in unique.values()]

        def attempt() -> int:
            dt = self._open(name)
            if not actions:
                return dt.version()
            dt.create_write_transaction(
                actions, mode="append", schema=dt.schema(),
                commit_properties=CommitProperties(custom_metadata=meta) if meta else None)
            dt.update_incremental()
            return dt.version()

        return self._with_retries(f"commit {len(actions)} data file(s) to table {name!r} at "
                                  f"{uri}", attempt)

    def read_data_files(self, name: str, files: Sequence[dict[str, Any]]) -> pa.Table:
        """The rows of data files a worker wrote (not committed yet), in the table's schema."""
        import pyarrow.parquet as pq

        uri, schema = self.uri(name), self._file_schema(name)
        parts = []
        for f in files:
            where = f"{uri}/{f['path']}"
            try:
                if self.scheme == "file":
                    parts.append(pq.read_table(where))
                else:
                    with self.fs.open(where, "rb") as fh:
                        parts.append(pq.read_table(fh))
            except (OSError, pa.ArrowException) as e:
                raise StorageError(f"cannot read data file {where} of table {name!r}: {e}") from e
        if not parts:
            return schema.empty_table()
        return _cast_to_table(pa.concat_tables(parts), schema, name, uri)

    def _with_retries(self, what: str, fn: Callable[[], _T]) -> _T:
        fault_point("before_table_commit")  # crash tests (vgen_core.faults)
        for i in range(_COMMIT_ATTEMPTS):
            try:
                result = fn()
                fault_point("after_table_commit")
                return result
            except StorageError:
                raise
            except CommitFailedError as e:
                if i == _COMMIT_ATTEMPTS - 1:
                    raise StorageError(
                        f"{what}: commit failed after {_COMMIT_ATTEMPTS} attempts: {e}"
                    ) from e
                time.sleep(0.05 * (2**i))
            except (DeltaError, OSError, pa.ArrowException) as e:
                raise StorageError(f"{what} failed: {e}") from e
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------------------------------
    # tables: reads
    # ----------------------------------------------------------------------------------------

    def read(
        self,
        name: str,
        *,
        version: int | None = None,
        columns: list[str] | None = None,
        filter: list[tuple] | list[list[tuple]] | None = None,
    ) -> pa.Table:
        """Read the table (latest or ``version``), optionally some ``columns`` and rows.

        ``filter`` uses pyarrow's notation: ``[("split", "=", "train"), ("label", "in", [1, 2])]``
        (AND), or a list of such lists (OR of ANDs). Ops: ``= == != < <= > >= in, not in``;
        ``("c", "=", None)`` means IS NULL. Row order is unspecified.
        """
        dt = self._open(name, version=version)
        schema = _arrow_schema(dt)
        cols = list(schema.names) if columns is None else list(columns)
        unknown = [c for c in cols if c not in schema.names]
        if unknown:
            raise StorageError(
                f"table {name!r} at {self.uri(name)} has no column(s) {unknown}; "
                f"columns: {schema.names}"
            )
        target = pa.schema([schema.field(c) for c in cols])
        where = _filter_to_sql(filter or [], set(schema.names))
        select = ", ".join(_quote_ident(c) for c in cols) if cols else "count(*) AS n"
        try:
            reader = QueryBuilder().register("t", dt).execute(f'SELECT {select} FROM "t"{where}')
            result = pa.RecordBatchReader.from_stream(reader).read_all()
        except Exception as e:
            raise StorageError(f"reading table {name!r} at {self.uri(name)} failed: {e}") from e
        if not cols:  # no columns, but the right number of rows (as pyarrow does)
            n = int(result.column("n")[0].as_py()) if result.num_rows else 0
            return pa.table({"n": pa.nulls(n)}).drop_columns(["n"])
        return result.cast(target)

    def iter_batches(
        self,
        name: str,
        *,
        version: int | None = None,
        columns: list[str] | None = None,
        batch_size: int = 1024,
    ) -> Iterator[pa.RecordBatch]:
        """Stream the table (latest or ``version``) as record batches of at most ``batch_size``
        rows, without holding the whole table in memory (a streaming scan)."""
        dt = self._open(name, version=version)
        schema = _arrow_schema(dt)
        cols = list(schema.names) if columns is None else list(columns)
        unknown = [c for c in cols if c not in schema.names]
        if unknown:
            raise StorageError(
                f"table {name!r} at {self.uri(name)} has no column(s) {unknown}; "
                f"columns: {schema.names}"
            )
        target = pa.schema([schema.field(c) for c in cols])
        select = ", ".join(_quote_ident(c) for c in cols)
        try:
            reader = pa.RecordBatchReader.from_stream(
                QueryBuilder().register("t", dt).execute(f'SELECT {select} FROM "t"')
            )
        except Exception as e:
            raise StorageError(f"reading table {name!r} at {self.uri(name)} failed: {e}") from e
        for batch in reader:
            for start in range(0, batch.num_rows, batch_size):
                yield batch.slice(start, batch_size).cast(target)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Commits of the table, oldest first: ``{"version", "timestamp" (UTC datetime),
        "operation", "metadata" (caller metadata, str -> str), "metrics"}``.

        Only commits still in the Delta log are listed (delta-rs cleans up logs older than
        ``delta.logRetentionDuration``, 30 days by default, at checkpoints).
        """
        dt = self._open(name)
        try:
            history = dt.history()
        except (DeltaError, OSError) as e:
            raise StorageError(
                f"cannot read the history of table {name!r} at {self.uri(name)}: {e}"
            ) from e
        out: list[dict[str, Any]] = []
        for h in history:
            meta = {k: v for k, v in h.items() if k not in _RESERVED_COMMIT_KEYS}
            ts = h.get("timestamp")
            out.append(
                {
                    "version": int(h["version"]),
                    "timestamp": _dt.datetime.fromtimestamp(ts / 1000.0, tz=_dt.timezone.utc)
                    if ts is not None
                    else None,
                    "operation": h.get("operation"),
                    "metadata": {
                        str(k): v if isinstance(v, str) else str(v) for k, v in meta.items()
                    },
                    "metrics": dict(h.get("operationMetrics") or {}),
                }
            )
        out.sort(key=lambda d: d["version"])
        return out

    def file_uris(self, name: str, version: int | None = None) -> list[str]:
        """URIs of the Parquet files of the table at ``version`` (latest by default)."""
        return list(self._open(name, version=version).file_uris())


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


#: longest string kept as a min / max file statistic (longer values: no min / max for that
#: column; a truncated max would be wrong)
_STATS_MAX_STRING = 64


def _file_stats(data: pa.Table) -> str:
    """Delta file statistics (JSON): ``numRecords``, and per top-level column ``nullCount``
    plus ``minValues`` / ``maxValues`` for integer and short string columns, so readers can
    prune files by ``sample_id``, ``fingerprint`` and the like."""
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for field in data.schema:
        col = data.column(field.name)
        t = field.type
        if pa.types.is_nested(t):
            continue
        nulls[field.name] = col.null_count
        if col.null_count == data.num_rows:
            continue
        if pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if isinstance(lo, str) and (len(lo) > _STATS_MAX_STRING
                                        or len(hi) > _STATS_MAX_STRING):
                continue
            mins[field.name], maxs[field.name] = lo, hi
    return json.dumps({"numRecords": data.num_rows, "minValues": mins, "maxValues": maxs,
                       "nullCount": nulls})


def _as_table(table: Any) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    raise TypeError(f"expected a pyarrow.Table, got {type(table).__name__}")


def _arrow_schema(dt: DeltaTable) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def _delta_schema(schema: pa.Schema, what: str) -> DeltaSchema:
    try:
        return DeltaSchema.from_arrow(pa.schema(list(schema)))  # drop Arrow metadata
    except Exception as e:
        raise StorageError(f"{what}: schema cannot be stored in Delta: {e}") from e


def _field_sig(f: Any) -> tuple[str, str, bool]:
    d = json.loads(f.to_json())
    return (d["name"], json.dumps(d["type"], sort_keys=True), bool(d["nullable"]))


def _field_desc(f: pa.Field) -> str:
    return f"{f.name}: {f.type}{'' if f.nullable else ' not null'}"


def _schema_commit_meta(schema: pa.Schema | None) -> dict[str, str]:
    if schema is None or not schema.metadata:
        return {}
    out = {}
    for k, v in schema.metadata.items():
        ks = k.decode("utf-8", "replace")
        if ks.startswith("vgen."):
            out[ks] = v.decode("utf-8", "replace")
    return out


def _commit_meta(
    commit_metadata: dict[str, str] | None, schema: pa.Schema | None
) -> dict[str, str]:
    meta = _schema_commit_meta(schema)
    for k, v in (commit_metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"commit_metadata must map str to str, got {k!r}: {v!r} ({type(v).__name__})"
            )
        if k in _RESERVED_COMMIT_KEYS:
            raise ValueError(
                f"commit_metadata key {k!r} is reserved by Delta; namespace it (vgen.{k})"
            )
        meta[k] = v
    return meta


def _cast_for_new_table(table: pa.Table, name: str) -> pa.Table:
    """Cast to the Arrow form of the Delta schema inferred from the input (uint8 -> int8, ...)."""
    target = pa.schema(_delta_schema(table.schema, f"table {name!r}").to_arrow())
    return _cast_columns(table, target, name, "<new table>").replace_schema_metadata(None)


def _cast_to_table(table: pa.Table, schema: pa.Schema, name: str, uri: str) -> pa.Table:
    have, want = set(table.column_names), set(schema.names)
    missing = [n for n in schema.names if n not in have]
    extra = [n for n in table.column_names if n not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"extra columns {extra}")
        raise StorageError(
            f"input does not match table {name!r} at {uri}: {' and '.join(parts)}; "
            f"table columns: {schema.names}"
        )
    return _cast_columns(table.select(schema.names), schema, name, uri)


def _cast_columns(table: pa.Table, schema: pa.Schema, name: str, uri: str) -> pa.Table:
    arrays = []
    for field in schema:
        col = table.column(field.name)
        if not field.nullable and col.null_count:
            raise StorageError(
                f"input for table {name!r} at {uri}: column {field.name!r} is not nullable but "
                f"has {col.null_count} null value(s)"
            )
        if col.type != field.type:
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise StorageError(
                    f"input for table {name!r} at {uri}: column {field.name!r} of type {col.type} "
                    f"cannot be stored as {field.type}: {e}"
                ) from e
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=schema)
