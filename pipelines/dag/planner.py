"""The planner: for each stage, up-to-date / partial / to-run, and why.

``plan_stage`` is used twice: by ``vgen plan`` (before anything runs, assuming upstream stages
keep their recorded outputs) and by the runner right before each stage (with the outputs its
upstream stages just produced), so both always agree on what "changed" means.

Before either, :func:`check_dag` asks every stage what its config points at outside the DAG
(data roots, weights files: :meth:`Stage.check_config`). ``vgen run`` refuses a DAG with a
problem before Ray starts, the MLflow run is opened or anything is written (:class:`ConfigErrors`,
exit 2); ``vgen plan`` / ``vgen status`` show such a stage as ``invalid`` (its downstream stages
as blocked) and still plan the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import DagError
from pipelines.stages import get_kind
from pipelines.stages.base import MapStage, OutputRef, SourceStage, Stage, StageContext

from .fingerprint import diff_parts, digest_parts
from .spec import Dag

UP_TO_DATE, PARTIAL, TO_RUN = "up-to-date", "partial", "to-run"
#: a stage whose config points at something that is not there (see :func:`check_dag`)
INVALID = "invalid"


class ConfigErrors(DagError):
    """One or more stages' configs point at data or files that cannot be read. ``problems``
    holds one :class:`DagError` per bad field (file, stage and field set); the message has one
    line per problem."""

    def __init__(self, problems: list[DagError]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = list(problems)
        first = self.problems[0] if self.problems else None
        self.file = first.file if first else None
        self.stage = first.stage if first else None
        self.field = first.field if first else None


def check_stage(dag: Dag, name: str, store: Any) -> list[DagError]:
    """What is wrong with the inputs stage ``name``'s config names (data roots, weights files),
    as DagErrors naming the DAG file, the stage and the field; nothing is computed or written."""
    spec = dag.stage(name)
    kind = get_kind(spec.uses)
    ctx = StageContext(dag=dag.name, stage=name, store=store, row_fingerprint="",
                       resources=spec.resources, error_budget=dag.spec.error_budget,
                       chunk_size=dag.spec.chunk_size)
    try:
        problems = kind(dag.configs[name], ctx).check_config()
    except Exception as e:  # a check that breaks is itself a problem to report, not a crash
        problems = [("with", f"checking the config failed: {type(e).__name__}: {e}")]
    out = []
    for field_, why in problems:
        out.append(DagError(why, file=dag.source, stage=name, field=field_))
    return out


def check_dag(dag: Dag, store: Any) -> dict[str, list[DagError]]:
    """:func:`check_stage` for every stage: {stage: problems} for the stages that have any."""
    out = {}
    for name in dag.order:
        problems = check_stage(dag, name, store)
        if problems:
            out[name] = problems
    return out


def require_valid_config(dag: Dag, store: Any) -> None:
    """Raise :class:`ConfigErrors` (one line per problem) if any stage has a problem."""
    problems = check_dag(dag, store)
    if problems:
        raise ConfigErrors([p for ps in problems.values() for p in ps])


@dataclass
class StagePlan:
    stage: str
    kind: str
    state: str
    reason: str
    fingerprint: str | None = None
    row_fingerprint: str | None = None
    parts: dict[str, Any] = field(default_factory=dict)
    todo: int | None = None  # samples to compute (per-sample stages, when known)
    total: int | None = None
    outputs: dict[str, OutputRef] = field(default_factory=dict)  # recorded, when up-to-date
    breakdown: dict[str, int] = field(default_factory=dict)  # new / changed / stale_tokenizer
    #: source stages: how changed files are found, ``size+mtime`` or ``content (verify)``
    sources: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "kind": self.kind, "state": self.state,
                "reason": self.reason, "fingerprint": self.fingerprint,
                "todo": self.todo, "total": self.total, "breakdown": self.breakdown,
                "sources": self.sources,
                "outputs": {k: v.to_json() for k, v in self.outputs.items()}}


def build_stage(dag: Dag, name: str, store: Any, inputs: dict[str, dict[str, OutputRef]],
                **ctx_kwargs: Any) -> tuple[Stage, str, dict[str, Any]]:
    """Instantiate a stage with its context; returns (stage, row fingerprint, row parts)."""
    spec = dag.stage(name)
    kind = get_kind(spec.uses)
    cfg = dag.configs[name]
    ctx = StageContext(dag=dag.name, stage=name, store=store, row_fingerprint="",
                       inputs=inputs, resources=spec.resources,
                       error_budget=dag.spec.error_budget, chunk_size=dag.spec.chunk_size,
                       **ctx_kwargs)
    stage = kind(cfg, ctx)
    row_parts = {"kind": kind.kind, "version": kind.version,
                 "config": cfg.model_dump(mode="json"), "extra": stage.row_fingerprint_parts()}
    ctx.row_fingerprint = digest_parts(row_parts)
    return stage, ctx.row_fingerprint, row_parts


def verifies_sources(dag: Dag, name: str, verify_sources: bool = False) -> bool:
    """Whether stage ``name`` decides changed sources by content this run: a source stage, with
    ``vgen run --verify-sources`` (``verify_sources``) or ``verify_sources: true`` in the DAG."""
    spec = dag.stage(name)
    return ((verify_sources or spec.verify_sources)
            and issubclass(get_kind(spec.uses), SourceStage))


def plan_stage(dag: Dag, name: str, store: Any, inputs: dict[str, dict[str, OutputRef]],
               upstream_fps: dict[str, str], last: dict | None, done: dict | None,
               *, count_work: bool = True, verify_sources: bool = False,
               **ctx_kwargs: Any) -> tuple[StagePlan, Stage]:
    """Plan stage ``name`` (see the module docstring). ``verify_sources``: source stages decide
    what changed by content (:class:`~pipelines.stages.base.SourceStage`), so they run even
    when their fingerprint (which sees only sizes and mtimes) is unchanged."""
    spec = dag.stage(name)
    verify = verifies_sources(dag, name, verify_sources)
    stage, row_fp, row_parts = build_stage(dag, name, store, inputs, verify_sources=verify,
                                           **ctx_kwargs)
    parts = {
        "row": row_parts,
        "source": stage.source_fingerprint(),
        "upstream": {u: {"fingerprint": upstream_fps[u],
                         "outputs": {k: (r.version if r.kind == "table" else r.digest)
                                     for k, r in sorted(inputs[u].items())
                                     if k not in _derived(dag, u)}}
                     for u in spec.needs},
    }
    fp = digest_parts(parts)
    plan = StagePlan(stage=name, kind=spec.uses, state=TO_RUN, reason="", fingerprint=fp,
                     row_fingerprint=row_fp, parts=parts,
                     sources=stage.sources_mode() if isinstance(stage, SourceStage) else None)
    lacking = [k for k in getattr(stage, "required_outputs", ())
               if done and k not in done["outputs"]]
    unchanged = (done is not None and done["fingerprint"] == fp and not lacking
                 and _outputs_exist(store, done["outputs"]))
    if unchanged and not verify and done is not None:
        plan.state, plan.reason = UP_TO_DATE, "fingerprint and outputs unchanged"
        plan.outputs = {k: OutputRef.from_json(v) for k, v in done["outputs"].items()}
        return plan, stage
    if unchanged:
        plan.reason = ("verify sources: sizes and mtimes unchanged; every file is read to "
                       "compare contents")
    elif last is not None and last["fingerprint"] == fp and last["status"] != "completed":
        plan.state = PARTIAL
        plan.reason = f"last run {last['status']} before finishing; continues where it stopped"
    elif done is None:
        plan.reason = "never ran" if last is None else f"last run {last['status']}"
    elif done["fingerprint"] == fp and lacking:
        plan.reason = (f"its record has no '{', '.join(lacking)}' output (written by an older "
                       "vgen); re-run to record it")
    elif done["fingerprint"] == fp:
        plan.reason = "outputs missing from storage"
    else:
        changes = diff_parts(done.get("fingerprint_parts") or {}, parts)
        plan.reason = "; ".join(changes[:4]) or "fingerprint changed"
    if count_work and isinstance(stage, MapStage):
        work = stage.plan_work()
        plan.total = work.total
        plan.todo = work.todo_count if work.items is None else None
        plan.breakdown = dict(work.breakdown)
        if plan.todo is not None:
            kinds = ", ".join(f"{v} {k.replace('_', '-')}" for k, v in work.breakdown.items() if v)
            plan.reason += (f" ({plan.todo} of {work.total} samples to compute"
                            + (f": {kinds}" if kinds else "") + ")")
        elif verify:
            n = work.breakdown.get("new_or_changed", 0)
            plan.reason += (f" ({work.total} samples; {n} new or changed by size+mtime; only "
                            "those whose content digest differs are written)")
        elif work.skipped:  # a source stage: items unchanged since they were last read
            plan.reason += (f" (sources of {work.total - work.skipped} of {work.total} samples "
                            "new or changed; the rest unchanged since last read)")
    return plan, stage


def _derived(dag: Dag, stage: str) -> tuple[str, ...]:
    """Outputs of ``stage`` implied by its row fingerprint (e.g. a tokenize stage's tokenizer):
    left out of downstream fingerprints, which already cover them through the side table."""
    return tuple(getattr(get_kind(dag.stage(stage).uses), "derived_outputs", ()))


def _outputs_exist(store: Any, outputs: dict[str, Any]) -> bool:
    for ref in outputs.values():
        if ref.get("kind") == "table":
            v = store.version(ref["name"])
            if v is None or (ref.get("version") is not None and v < ref["version"]):
                return False
        elif ref.get("kind") == "model":
            fs, path = _fs(ref["uri"])
            if not fs.exists(path):
                return False
    return True


def _fs(uri: str):
    from vgen_core.data.fsio import filesystem_for

    return filesystem_for(uri)


def plan_dag(dag: Dag, store: Any, state: Any,
             problems: dict[str, list[DagError]] | None = None, *,
             verify_sources: bool = False, count_work: bool = True) -> list[StagePlan]:
    """Plan every stage, assuming up-to-date stages keep their recorded outputs. A stage with
    config problems (``problems``, default :func:`check_dag`) is ``invalid``, with the problems
    as its reason; the stages downstream of it are not planned further. ``verify_sources``: as
    ``vgen run --verify-sources`` would (:func:`plan_stage`). ``count_work=False`` leaves out the
    to-do counts of stages that will run (``todo`` / ``total`` / ``breakdown`` stay unset, and
    reasons say no counts; states and fingerprints are the same): enough to tell whether
    anything runs, and it saves the per-sample diff, e.g. ~3-4 s and ~1 GiB at 10^6 rows for a
    changed source stage (benchmarks/scaling.py), which the stage computes again when it runs."""
    if problems is None:
        problems = check_dag(dag, store)
    last, done = state.latest(dag.name)
    plans: dict[str, StagePlan] = {}
    unplanned: set[str] = set()  # invalid stages and everything downstream of them
    for name in dag.order:
        needs = dag.stage(name).needs
        if name in problems:
            plans[name] = StagePlan(name, dag.stage(name).uses, INVALID, "; ".join(
                f"{p.field}: {getattr(p, 'detail', p)}" if p.field else str(p)
                for p in problems[name]))
            unplanned.add(name)
            continue
        behind = [u for u in needs if u in unplanned]
        if behind:
            plans[name] = StagePlan(name, dag.stage(name).uses, TO_RUN,
                                    f"blocked: upstream {', '.join(repr(u) for u in behind)} "
                                    "has an invalid config")
            unplanned.add(name)
            continue
        blocked = [u for u in needs if plans[u].state != UP_TO_DATE]
        if blocked:
            plans[name] = StagePlan(name, dag.stage(name).uses, TO_RUN,
                                    "upstream " + ", ".join(repr(b) for b in blocked)
                                    + " will run first")
            continue
        inputs = {u: plans[u].outputs for u in needs}
        fps = {u: plans[u].fingerprint or "" for u in needs}  # planned: all set
        plans[name], _ = plan_stage(
            dag,
            name,
            store,
            inputs,
            fps,
            last.get(name),
            done.get(name),
            count_work=count_work,
            verify_sources=verify_sources,
        )
    return [plans[n] for n in dag.order]


def to_mermaid(dag: Dag, plans: list[StagePlan] | None = None) -> str:
    """The DAG as a Mermaid flowchart (states as classes when a plan is given)."""
    state = {p.stage: p.state for p in plans or []}
    lines = ["flowchart LR"]
    for n in dag.order:
        label = f"{n}<br/>{dag.stage(n).uses}"
        if n in state:
            label += f"<br/><i>{state[n]}</i>"
        lines.append(f'  {n}["{label}"]')
    for n in dag.order:
        for u in dag.stage(n).needs:
            lines.append(f"  {u} --> {n}")
    if plans:
        lines += [
            "  classDef uptodate fill:#d4edda;",
            "  classDef torun fill:#fff3cd;",
            "  classDef partial fill:#f8d7da;",
            "  classDef invalid fill:#f5c6cb;",
        ]
        for n, s in state.items():
            lines.append(f"  class {n} {s.replace('-', '').replace('uptodate', 'uptodate')};")
    return "\n".join(lines)
