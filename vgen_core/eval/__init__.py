"""Evaluation metrics. `recon` holds tokenizer reconstruction and codebook statistics."""

from vgen_core.eval.recon import bit_balance, codebook_usage, psnr

__all__ = ["bit_balance", "codebook_usage", "psnr"]
