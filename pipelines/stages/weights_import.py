"""``import.weights``: a released (or converted) checkpoint as a model output of the DAG.

The stage stands where a ``train.tokenizer`` / ``train.generator`` stage would: it loads
``with.weights`` into ``with.model`` / ``with.size`` (``overrides`` applied) through the same
strict mapping as ``vgen weights convert`` (:func:`vgen_core.weights.load_weights`: a released
``.safetensors`` / ``.bin`` read weights-only, or a ``vgen weights convert`` folder whose
manifest's pixel range must be the family's), writes a vgen export under
``<storage>/models/<dag>/<stage>/<fingerprint>``, and outputs it as ``tokenizer`` (a tokenizer
family) or ``generator`` (a generator family). Downstream stages take it exactly as a trained
model: a tokenize stage encodes with an upstream ``tokenizer``, ``evaluate.generation`` samples
an upstream ``generator``::

    rar: {uses: import.weights, with: {model: rar, size: rar-b, weights: /ckpt/rar_b.bin}}
    eval: {uses: evaluate.generation, needs: [rar, tokens]}

The fingerprint is the weights file's digest and the resolved config: an unchanged import is
skipped, a new file re-imports (and re-runs what depends on it). The export's digest is the
output's digest, as for a trained model. Errors (unreadable file, another family or size, a
pixel-range mismatch) fail the stage with the reason before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, ClassVar

from pydantic import Field

from vgen_core import families

from .base import Counts, JobStage, OutputRef, StageConfig, StageError, StageResult

__all__ = ["ImportWeights", "ImportWeightsConfig"]


class ImportWeightsConfig(StageConfig):
    model: str = Field(description="model family (vgen_core.families; `vgen families`)")
    size: str = Field(description="the family's size the checkpoint is (`vgen weights inspect` "
                      "names the best match)")
    overrides: dict[str, Any] = Field(default_factory=dict)
    weights: str = Field(description="released checkpoint (.safetensors, or .bin / .pt read "
                         "weights-only; local or s3://), or a `vgen weights convert` folder")


class ImportWeights(JobStage):
    kind = "import.weights"
    version = 1
    Config = ImportWeightsConfig
    needs_range = (0, 0)
    weights_fields: ClassVar[tuple[str, ...]] = ("weights",)
    config: ImportWeightsConfig

    def _where(self) -> str:
        return f"stage '{self.ctx.stage}'"

    @property
    def spec(self) -> families.FamilySpec:
        try:
            spec = families.get(self.config.model)
        except ValueError as e:
            raise StageError(f"{self._where()}: {e}") from None
        if spec.role not in ("tokenizer", "generator"):
            raise StageError(f"{self._where()}: '{spec.name}' is a {spec.role}; import.weights "
                             "takes tokenizer and generator families")
        return spec

    @property
    def output_key(self) -> str:
        return "tokenizer" if self.spec.role == "tokenizer" else "generator"

    def model_config(self) -> Any:
        try:
            return self.spec.config(self.config.size, **self.config.overrides)
        except ValueError as e:
            raise StageError(f"{self._where()}: {e}") from None

    def weights_target(self) -> tuple[str, Any, str | None] | None:
        return self.spec.name, self.model_config(), self.spec.pixel_range

    def row_fingerprint_parts(self) -> dict[str, Any]:
        from .tokenize import weights_file_digest

        spec = self.spec
        return {"weights_file": weights_file_digest(self.config.weights, self._where()),
                "model_config": self.model_config().model_dump(mode="json"),
                "pixel_range": spec.pixel_range}

    def run(self, executor: Any = None) -> StageResult:
        from vgen_core.data.fsio import fetch_file, fetch_model_dir, filesystem_for
        from vgen_core.tokenizers.io import save_pretrained, weights_digest
        from vgen_core.weights import WeightsError, load_weights

        from vgen_core.weights import export_uri

        spec, uri = self.spec, export_uri(self.config.weights)
        name = f"models/{self.ctx.dag}/{self.ctx.stage}/{self.ctx.row_fingerprint}"
        output_uri = self.ctx.store.path(name)
        with tempfile.TemporaryDirectory() as tmp:
            fs, path = filesystem_for(uri)
            local = (fetch_model_dir(uri, f"{tmp}/in") if fs.isdir(path)
                     else fetch_file(uri, tmp))
            try:
                model = load_weights(local, spec.name, self.model_config(),
                                     pixel_range=spec.pixel_range,
                                     what=f"{self._where()} with.weights {uri}")
            except WeightsError as e:
                raise StageError(str(e)) from None
            digest = weights_digest(model)
            out = save_pretrained(model, f"{tmp}/out")
            ofs, opath = filesystem_for(output_uri)
            ofs.makedirs(opath, exist_ok=True)
            for fname in sorted(os.listdir(out)):
                ofs.put(os.path.join(out, fname), f"{opath.rstrip('/')}/{fname}")
        n = len(model.state_dict())
        self.ctx.tracker.set_tags({"vgen.weights.source": uri, "vgen.digest": digest,
                                   "vgen.family": spec.name, "vgen.size": self.config.size})
        return StageResult(outputs={self.output_key: OutputRef("model", name, output_uri,
                                                               digest=digest)},
                           metrics={"weights.tensors": float(n)}, counts=Counts(processed=1))
