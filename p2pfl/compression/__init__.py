"""Compressed model updates: delta against a public copy, top-k with error feedback,
int8/int4/float16 quantization, zstd; self-describing headers, hostile-input decoding.

See docs/compression.md for the design (why deltas are taken against x_hat, keyframes,
missing_base) and the measurements.
"""

from p2pfl.compression.consensus import ConsensusRule, consensus_step, with_consensus
from p2pfl.compression.decoder import REASONS, UpdateDecoder
from p2pfl.compression.encoder import UpdateEncoder
from p2pfl.compression.pipeline import Pipeline, Quantize, TopK, Zstd, parse_pipeline

__all__ = [
    "REASONS",
    "ConsensusRule",
    "Pipeline",
    "Quantize",
    "TopK",
    "UpdateDecoder",
    "UpdateEncoder",
    "Zstd",
    "consensus_step",
    "parse_pipeline",
    "with_consensus",
]
