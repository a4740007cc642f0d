"""Stage kinds: one module per kind family. ``uses:`` in a DAG names a kind from ``KINDS``.

=================== ===================================== =================================
kind                module                                what it does
=================== ===================================== =================================
ingest.images       ingest.py                             image folder / skimage -> curated table
curate.pancap       curate.py                             COCONut-PanCap download -> curated table
curate.vicas        curate.py                             ViCaS download -> curated table
train.tokenizer     train.py                              Ray Train + DeepSpeed: an image tokenizer
tokenize.lfq        tokenize.py                           curated images -> LFQ bit tokens
tokenize.fsq        tokenize.py                           curated images -> BAR binary-FSQ bits
tokenize.titok      tokenize.py                           curated images -> TiTok 1D VQ ids
cache.latents       cache_latents.py                      curated images -> VAE / TiTok-KL moments
tokenize.deltatok   deltatok.py                           curated videos -> DeltaTok delta tokens
train.generator     train.py                              Ray Train + DeepSpeed: a token generator
import.weights      weights_import.py                     a released checkpoint as a model output
quantize.ternary    quantize.py                           a generator made 1.58-bit (distilled)
evaluate.tokenizer  evaluate.py                           recon. PSNR, codebook usage, samples
evaluate.generation evaluate_generation.py                samples: FID, sFID, IS, prec./recall
evaluate.panoptic   evaluate_segmentation.py              panoptic predictions: PQ / SQ / RQ
evaluate.vicas      evaluate_segmentation.py              ViCaS LG-VIS predictions: track mAP
=================== ===================================== =================================

The contract every kind follows is in :mod:`pipelines.stages.base`.
"""

from __future__ import annotations

import importlib

KINDS: dict[str, str] = {
    "ingest.images": "pipelines.stages.ingest:IngestImages",
    "curate.pancap": "pipelines.stages.curate:CuratePanCap",
    "curate.vicas": "pipelines.stages.curate:CurateViCaS",
    "tokenize.lfq": "pipelines.stages.tokenize:TokenizeLFQ",
    "tokenize.fsq": "pipelines.stages.tokenize:TokenizeFSQ",
    "tokenize.titok": "pipelines.stages.tokenize:TokenizeTiTok",
    "cache.latents": "pipelines.stages.cache_latents:CacheLatents",
    "tokenize.deltatok": "pipelines.stages.deltatok:TokenizeDeltaTok",
    "train.tokenizer": "pipelines.stages.train:TrainTokenizer",
    "train.generator": "pipelines.stages.train:TrainGenerator",
    "import.weights": "pipelines.stages.weights_import:ImportWeights",
    "quantize.ternary": "pipelines.stages.quantize:QuantizeTernary",
    "evaluate.tokenizer": "pipelines.stages.evaluate:EvaluateTokenizer",
    "evaluate.generation": "pipelines.stages.evaluate_generation:EvaluateGeneration",
    "evaluate.panoptic": "pipelines.stages.evaluate_segmentation:EvaluatePanoptic",
    "evaluate.vicas": "pipelines.stages.evaluate_segmentation:EvaluateViCaS",
}


def known_kinds() -> list[str]:
    return sorted(KINDS)


def get_kind(kind: str):
    """The stage class for ``kind`` (KeyError when unknown)."""
    target = KINDS[kind]
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
