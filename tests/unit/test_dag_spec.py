"""DAG validation: every error names the file, the stage and the field."""

from pathlib import Path

import pytest
import yaml

from pipelines.dag.fingerprint import diff_parts, digest_parts
from pipelines.dag.planner import to_mermaid
from pipelines.dag.spec import DagError, load_dag

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "demo.yaml"


def write(tmp_path, data) -> Path:
    p = tmp_path / "dag.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def base():
    return {"name": "t", "storage": "/tmp/x", "stages": {
        "images": {"uses": "ingest.images"},
        "tokens": {"uses": "tokenize.lfq", "needs": ["images"], "with": {"resolution": 32}},
    }}


def test_demo_validates_with_defaults_filled():
    dag = load_dag(DEMO, storage="/tmp/somewhere")
    assert dag.order == ["pancap", "vicas", "images", "tokenizer", "tokens", "generator", "eval"]
    assert dag.spec.storage == "/tmp/somewhere"
    resolved = dag.resolved()
    assert resolved["stages"]["tokens"]["with"]["flip"] is True
    assert resolved["stages"]["tokenizer"]["with"]["train"]["zero_stage"] == 2


def test_unknown_kind_lists_known_kinds(tmp_path):
    d = base()
    d["stages"]["tokens"]["uses"] = "tokenize.nope"
    with pytest.raises(DagError) as e:
        load_dag(write(tmp_path, d))
    msg = str(e.value)
    assert "dag.yaml" in msg and "stage 'tokens'" in msg and "field 'uses'" in msg
    assert "tokenize.lfq" in msg and "ingest.images" in msg


def test_bad_config_field_names_stage_and_field(tmp_path):
    d = base()
    d["stages"]["tokens"]["with"]["resolution"] = "big"
    with pytest.raises(DagError) as e:
        load_dag(write(tmp_path, d))
    assert e.value.stage == "tokens" and e.value.field == "with.resolution"


def test_unknown_config_key(tmp_path):
    d = base()
    d["stages"]["tokens"]["with"]["resolutoin"] = 64
    with pytest.raises(DagError) as e:
        load_dag(write(tmp_path, d))
    assert e.value.field == "with.resolutoin" and "resolution" in str(e.value)


def test_cycle_is_named(tmp_path):
    d = base()
    d["stages"]["images"] = {"uses": "tokenize.lfq", "needs": ["tokens"]}
    with pytest.raises(DagError) as e:
        load_dag(write(tmp_path, d))
    assert "cycle" in str(e.value)
    assert "tokens -> images -> tokens" in str(e.value) or "images -> tokens -> images" in str(e.value)


def test_unknown_need_and_needs_count(tmp_path):
    d = base()
    d["stages"]["tokens"]["needs"] = ["imagez"]
    with pytest.raises(DagError, match="needs unknown stage 'imagez'"):
        load_dag(write(tmp_path, d))
    d = base()
    d["stages"]["images"]["needs"] = ["tokens"]
    d["stages"]["tokens"]["needs"] = []
    with pytest.raises(DagError) as e:
        load_dag(write(tmp_path, d))
    assert e.value.field == "needs"


def test_invalid_yaml_reports_line(tmp_path):
    with pytest.raises(DagError, match="line 2"):
        load_dag(write(tmp_path, "name: x\nstages: {a: 1]\n"))


def test_top_level_and_resources_errors(tmp_path):
    d = base()
    d["error_budget"] = 2
    with pytest.raises(DagError) as e:
        load_dag(write(tmp_path, d))
    assert e.value.field == "error_budget"
    d = base()
    d["stages"]["tokens"]["resources"] = {"cpus": 0}
    with pytest.raises(DagError) as e:
        load_dag(write(tmp_path, d))
    assert e.value.stage == "tokens" and e.value.field == "resources.cpus"


def test_env_interpolation(tmp_path, monkeypatch):
    d = base()
    d["stages"]["images"]["with"] = {"root": "${MY_IMAGES:-skimage://}"}
    p = write(tmp_path, d)
    assert load_dag(p).configs["images"].root == "skimage://"
    monkeypatch.setenv("MY_IMAGES", "/data/imgs")
    assert load_dag(p).configs["images"].root == "/data/imgs"


def test_fingerprint_helpers():
    a = {"row": {"config": {"x": 1}}, "upstream": {"u": {"outputs": {"samples": 1}}}}
    b = {"row": {"config": {"x": 2}}, "upstream": {"u": {"outputs": {"samples": 2}}}}
    assert digest_parts(a) == digest_parts({"upstream": a["upstream"], "row": a["row"]})
    assert digest_parts(a) != digest_parts(b)
    assert diff_parts(a, b) == ["row.config.x: 1 -> 2", "upstream.u.outputs.samples: 1 -> 2"]


def test_mermaid():
    dag = load_dag(DEMO)
    text = to_mermaid(dag)
    assert text.startswith("flowchart LR")
    assert "images --> tokenizer" in text and "generator --> eval" in text
