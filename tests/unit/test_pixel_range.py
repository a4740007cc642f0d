"""The pixel range is the model family's, one home for every stage (FamilySpec.pixel_range).

Official MaskBit trains and evaluates its LFQ tokenizer on [0, 1] images (data/webdataset_reader.py:
ToTensor, no Normalize; scripts/eval_tokenizer.py clamps to [0, 1]), so the LFQ family is
``unit``: tokenize.lfq, evaluate.tokenizer, evaluate.generation's decode and the training loss
all hand the model [0, 1] pixels (a white image is 1.0, a black one 0.0), and a stage option
that would pick another range is refused by name.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from pipelines.dag.spec import DagError, load_dag
from pipelines.stages.base import InProcessExecutor, OutputRef, StageContext
from pipelines.stages.evaluate import EvaluateTokenizer, EvaluateTokenizerConfig
from pipelines.stages.evaluate_generation import decode_to_uint8
from pipelines.stages.tokenize import ImageTokenizeConfig, TokenizeLFQ
from vgen_core import families
from vgen_core.data import TableStore, content_digest
from vgen_core.data.sample_images import encode_png
from vgen_core.data.schemas import IMAGE_SAMPLES
from vgen_core.families import FamilySpec
from vgen_core.tokenizers.lfq import LFQTokenizer
from vgen_core.training.tasks import images_to_model

RES = 32


def test_lfq_family_is_maskbit_unit_range():
    assert families.get("lfq").pixel_range == "unit"
    assert families.pixel_range_of(families.get("lfq")) == "unit"


@pytest.fixture
def seen(monkeypatch):
    """Every LFQ encode records the (min, max) of the pixels it was given."""
    record: list[tuple[float, float]] = []
    real = LFQTokenizer.encode

    def spy(self, x_BCHW):
        record.append((float(x_BCHW.min()), float(x_BCHW.max())))
        return real(self, x_BCHW)

    monkeypatch.setattr(LFQTokenizer, "encode", spy)
    return record


def black_white_table(store: TableStore) -> OutputRef:
    rows = []
    for i, value in enumerate((0, 255, 0, 255)):
        png = encode_png(np.full((RES, RES, 3), value, np.uint8))
        rows.append({"sample_id": f"img/{i}", "content_digest": content_digest(png),
                     "source": f"mem://{i}", "image_png": png, "height": RES, "width": RES,
                     "label": i % 2, "caption": None})
    v = store.append("t/images", pa.Table.from_pylist(rows, schema=IMAGE_SAMPLES))
    return OutputRef("table", "t/images", store.uri("t/images"), version=v)


def tokenize_lfq(store: TableStore, ref: OutputRef):
    ctx = StageContext(dag="t", stage="tok", store=store, row_fingerprint="fp",
                       inputs={"images": {"samples": ref}}, chunk_size=4, error_budget=0.0)
    stage = TokenizeLFQ(ImageTokenizeConfig(size="tiny", resolution=RES, flip=False), ctx)
    result = stage.run(InProcessExecutor(batch_size=1))
    assert result.counts.processed == 4
    return result


def test_tokenize_and_evaluate_feed_lfq_unit_pixels(tmp_path, seen):
    store = TableStore(str(tmp_path / "store"))
    ref = black_white_table(store)
    result = tokenize_lfq(store, ref)
    # one image per batch: black is exactly 0.0, white exactly 1.0 (not -1 / 1)
    assert (0.0, 0.0) in seen and (1.0, 1.0) in seen
    assert all(0.0 <= lo <= hi <= 1.0 for lo, hi in seen)
    meta = store.read(result.outputs["samples"].name).to_pylist()
    assert meta and len(meta) == 4

    seen.clear()
    ctx = StageContext(dag="t", stage="eval", store=store, row_fingerprint="fp-eval",
                       inputs={"tokens": result.outputs})
    EvaluateTokenizer(EvaluateTokenizerConfig(num_samples=0), ctx).run(InProcessExecutor())
    assert seen, "evaluate.tokenizer did not encode through the LFQ family"
    assert min(lo for lo, _ in seen) == 0.0 and max(hi for _, hi in seen) == 1.0


def test_generation_decode_reads_the_family_range(monkeypatch):
    torch.manual_seed(0)
    model = families.get("lfq").build("tiny").eval()
    # a decoder that returns 0.0 then 1.0: under [0, 1] these are black and white pixels
    # ([-1, 1] would make them 128 and 255)
    monkeypatch.setattr(LFQTokenizer, "decode_indices",
                        lambda self, idx: torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 4, 4))
    images = decode_to_uint8(model, torch.zeros(2, 4, dtype=torch.long), (2, 2))
    assert images.shape == (2, 4, 4, 3)
    assert (images[0] == 0).all() and (images[1] == 255).all()


def test_training_loss_sees_unit_pixels(seen):
    torch.manual_seed(0)
    spec = families.get("lfq")
    model = spec.build("tiny")
    image = torch.stack([torch.zeros(RES, RES, 3), torch.full((RES, RES, 3), 255.0)]).byte()
    assert spec.loss is not None
    loss, _ = spec.loss(model, {"image": image}, step=0)
    assert torch.isfinite(loss)
    assert seen == [(0.0, 1.0)]
    x = images_to_model(image, "lfq")  # the train path's helper: the family's range too
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


@pytest.mark.parametrize("key", ["pixel_range", "normalize"])
def test_a_stage_asking_for_another_range_is_refused(tmp_path, key):
    dag = {"name": "t", "storage": str(tmp_path), "stages": {
        "images": {"uses": "ingest.images"},
        "tokens": {"uses": "tokenize.lfq", "needs": ["images"],
                   "with": {"resolution": RES, key: "signed"}},
    }}
    path = tmp_path / "dag.yaml"
    path.write_text(yaml.safe_dump(dag))
    with pytest.raises(DagError) as e:
        load_dag(path)
    assert e.value.stage == "tokens" and e.value.field == f"with.{key}"
    assert "family" in str(e.value) and "pixel range" in str(e.value)
    # in-process, the stage config refuses the key as well (unknown keys are errors)
    with pytest.raises(ValueError, match=key):
        ImageTokenizeConfig.model_validate({"resolution": RES, key: "signed"})


def test_a_tokenizer_family_must_declare_its_range():
    lfq = families.get("lfq")
    kw = dict(name="x", role="tokenizer", config_class=lfq.config_class, sizes=lfq.sizes,
              model_class=lfq.model_class)
    with pytest.raises(ValueError, match="pixel range"):
        FamilySpec(**kw)
    with pytest.raises(ValueError, match="pixel range"):
        FamilySpec(**kw, pixel_range="zero-one")
    assert FamilySpec(**kw, pixel_range="unit").pixel_range == "unit"
