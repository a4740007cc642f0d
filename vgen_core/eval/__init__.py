"""Evaluation metrics.

* ``recon``: PSNR, codebook usage and entropy, bit balance (tokenizers);
* ``fid`` + ``extractors``: streaming feature statistics, FID / sFID / IS / precision-recall, the
  standard FID InceptionV3 (local weights) and a tiny built-in extractor; every result names its
  extractor and results of different extractors are never compared;
* ``reference``: reference statistics (curated table versions, ADM ``.npz`` batches), their
  Delta cache ``_vgen/reference_stats`` and the comparability flag; ADM's five numbers at once;
* ``panoptic_quality``: PQ/SQ/RQ as panopticapi computes them (PanCap);
* ``track_map``: ViCaS LG-VIS track mAP as the official scorer computes it;
* ``plots``: histograms for MLflow.
"""

from vgen_core.eval.recon import bit_balance, codebook_usage, psnr

__all__ = ["bit_balance", "codebook_usage", "psnr"]
