"""DAG spec: YAML -> validated, typed model.

A DAG file looks like::

    name: demo                     # [a-z0-9][a-z0-9_-]*
    storage: ./.vgen-demo          # local path or s3://bucket/prefix; --storage / VGEN_STORAGE win
    tracking: null                 # MLflow URI; default sqlite:///<storage>/mlflow.db
    error_budget: 0.01             # fraction of a stage's samples it may quarantine
    chunk_size: 256                # rows per atomic commit of per-sample stages
    in_process_rows: 512           # a stage's to-do at most this (and no GPU): run in the driver
    stages:
      images: {uses: ingest.images, with: {root: "skimage://"}}
      tokens: {uses: tokenize.lfq, needs: [images], with: {...}, resources: {cpus: 1}}

Beside ``with:`` (the kind's config, part of the fingerprint: changing it recomputes the rows)
a stage may carry keys that say *how* it runs, not what it makes, so they never change a
fingerprint: ``resources:`` and, on source stages (``ingest.*``, ``curate.*``),
``verify_sources: true``, which decides a source file changed by its content rather than by its
size and mtime on every run of this stage (what ``vgen run --verify-sources`` does for one run;
see :class:`pipelines.stages.base.SourceStage`).

``${VAR}`` and ``${VAR:-default}`` in string values are replaced from the environment before
validation. Every error names the file, the stage and the field (:class:`DagError`); nothing
runs until the whole file validates.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipelines.errors import DagError

__all__ = ["DagError", "ResourcesSpec", "StageSpec", "DagSpec", "Dag", "load_dag", "parse_dag"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ResourcesSpec(BaseModel):
    """What one worker of a stage needs. ``workers`` is the train worker count, or the largest
    actor pool a per-sample stage may use (the runner also caps it by the cluster's resources)."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    workers: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    uses: str
    needs: list[str] = Field(default_factory=list)
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    #: source stages only: re-read every listed file and compare content digests instead of
    #: trusting size + mtime (not part of any fingerprint; see the module docstring)
    verify_sources: bool = False

    @field_validator("with_", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class DagSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    storage: str = "./.vgen"
    tracking: str | None = None
    error_budget: float = Field(0.01, ge=0.0, le=1.0)
    chunk_size: int = Field(256, ge=1)
    #: how the DAG runs, not what it makes (no fingerprint): a per-sample stage whose to-do is
    #: at most this many rows (files, for a source stage) and that asks for no GPU runs in the
    #: driver process instead of a Ray actor pool (``pipelines.dag.ray_exec.RayDataExecutor``); 0
    #: sends all work to Ray. ``VGEN_IN_PROCESS_ROWS`` in the environment overrides it
    in_process_rows: int = Field(512, ge=0)
    stages: dict[str, StageSpec]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"expected lowercase letters, digits, '_' or '-' (got {v!r})")
        return v


class Dag:
    """A validated DAG: the spec, each stage's typed config, and a topological order."""

    def __init__(self, spec: DagSpec, configs: dict[str, BaseModel], source: str):
        self.spec, self.configs, self.source = spec, configs, source
        self.order = _topological_order(spec, source)
        #: path -> template (as written in the file) of each value a ``${VAR}`` filled in
        self.env_substituted: dict[tuple, str] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def stage(self, name: str) -> StageSpec:
        return self.spec.stages[name]

    def downstream(self, name: str) -> list[str]:
        return [s for s in self.order if name in self.spec.stages[s].needs]

    def resolved(self, *, redact: bool = True) -> dict[str, Any]:
        """The DAG with every stage config filled with its defaults (what MLflow records).

        With ``redact`` (the default) it is safe to record: each value a ``${VAR}`` filled in
        shows as its template (``${MLFLOW_PASSWORD}``), URIs lose their user-info and values
        under credential-like keys are ``***`` (:func:`vgen_core.tracking.redact.redact_config`).
        """
        out = self.spec.model_dump(by_alias=True)
        for s, cfg in self.configs.items():
            out["stages"][s]["with"] = cfg.model_dump(mode="json")
        if not redact:
            return out
        from vgen_core.tracking.redact import redact_config

        return redact_config(out, self.env_substituted)

    def stage_config(self, name: str, *, redact: bool = True) -> dict[str, Any]:
        """Stage ``name``'s config with its defaults, redacted like :meth:`resolved`."""
        return self.resolved(redact=redact)["stages"][name]["with"]


def _interpolate(value: Any, path: tuple = (), found: dict[tuple, str] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in strings; ``found`` receives path -> template
    for each string that had a substitution (what :meth:`Dag.resolved` shows instead)."""
    if isinstance(value, str):
        out = _ENV_RE.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
        if found is not None and _ENV_RE.search(value):
            found[path] = value
        return out
    if isinstance(value, dict):
        return {k: _interpolate(v, path + (k,), found) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path + (i,), found) for i, v in enumerate(value)]
    return value


#: stage options that would override what a model family fixes (refused with a clear message)
_FAMILY_KEYS = frozenset({"pixel_range", "pixels", "normalize", "normalise"})


def _loc_to_field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def parse_dag(data: Any, source: str = "<dag>", *, storage: str | None = None,
              tracking: str | None = None) -> Dag:
    """Validate a DAG given as parsed YAML. ``storage``/``tracking`` override the file's values."""
    from pipelines.stages import known_kinds, get_kind
    from pipelines.stages.base import SourceStage

    if not isinstance(data, dict):
        raise DagError(f"expected a mapping at the top level, got {type(data).__name__}",
                       file=source)
    substituted: dict[tuple, str] = {}
    data = _interpolate(data, (), substituted)
    if storage:
        data["storage"] = storage
        substituted.pop(("storage",), None)
    if tracking:
        data["tracking"] = tracking
        substituted.pop(("tracking",), None)
    if not isinstance(data.get("stages"), dict) or not data["stages"]:
        raise DagError("expected a non-empty mapping 'stages: {name: {uses: ..., ...}}'",
                       file=source, field="stages")
    try:
        spec = DagSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        stage = str(loc[1]) if len(loc) > 1 and loc[0] == "stages" else None
        field = _loc_to_field(loc[2:] if stage else loc) or None
        raise DagError(f"{err['msg']} (got {err.get('input')!r})", file=source, stage=stage,
                       field=field) from None

    configs: dict[str, BaseModel] = {}
    for name, st in spec.stages.items():
        if not _NAME_RE.match(name):
            raise DagError("stage names use lowercase letters, digits, '_' or '-'", file=source,
                           stage=name)
        try:
            kind = get_kind(st.uses)
        except KeyError:
            raise DagError(f"unknown stage kind {st.uses!r}; known kinds: "
                           f"{', '.join(known_kinds())}", file=source, stage=name,
                           field="uses") from None
        for need in st.needs:
            if need not in spec.stages:
                raise DagError(f"needs unknown stage {need!r}; stages in this DAG: "
                               f"{', '.join(spec.stages)}", file=source, stage=name, field="needs")
        for key in _FAMILY_KEYS & set(st.with_ or {}):
            raise DagError(f"the pixel range / normalisation is the model family's "
                           f"(FamilySpec.pixel_range, per release), the same for every stage; "
                           f"`{st.uses}` takes no {key!r}: remove it", file=source, stage=name,
                           field=f"with.{key}")
        try:
            configs[name] = kind.Config.model_validate(st.with_)
        except ValidationError as e:
            err = e.errors()[0]
            raise DagError(f"{err['msg']} (got {err.get('input')!r}); see `{st.uses}` config "
                           f"fields: {', '.join(kind.Config.model_fields)}", file=source,
                           stage=name, field="with." + _loc_to_field(err["loc"])) from None
        kind.check_needs(name, st, spec, source)
        if st.verify_sources and not issubclass(kind, SourceStage):
            sources = [k for k in known_kinds() if issubclass(get_kind(k), SourceStage)]
            raise DagError(f"verify_sources applies to source stages, which read files "
                           f"({', '.join(sources)}); `{st.uses}` reads tables: remove the key",
                           file=source, stage=name, field="verify_sources")
    dag = Dag(spec, configs, source)
    dag.env_substituted = substituted
    return dag


def load_dag(path: str | os.PathLike, *, storage: str | None = None,
             tracking: str | None = None) -> Dag:
    """Read and validate a DAG file (see the module docstring for the format)."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DagError(f"cannot read the DAG file: {e.strerror}", file=source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DagError(f"invalid YAML{at}: {getattr(e, 'problem', e)}", file=source) from None
    return parse_dag(data, source, storage=storage, tracking=tracking)


def _topological_order(spec: DagSpec, source: str) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    stack: list[str] = []

    def visit(n: str) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = stack[stack.index(n):] + [n]
            raise DagError(f"the DAG has a cycle: {' -> '.join(cycle)}; remove one of these "
                           "'needs' edges", file=source, stage=n, field="needs")
        state[n] = 1
        stack.append(n)
        for m in spec.stages[n].needs:
            visit(m)
        stack.pop()
        state[n] = 2
        order.append(n)

    for n in spec.stages:
        visit(n)
    return order
