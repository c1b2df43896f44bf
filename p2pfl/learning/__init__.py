"""Local learning: the Model protocol, numpy softmax/MLP, datasets and partitioners."""

from p2pfl.learning.datasets import DATASET_NAMES, Dataset, load_dataset
from p2pfl.learning.model import MODEL_NAMES, Model, build_model
from p2pfl.learning.partition import SCHEMES, node_shard, partition_indices

__all__ = [
    "DATASET_NAMES",
    "MODEL_NAMES",
    "SCHEMES",
    "Dataset",
    "Model",
    "build_model",
    "load_dataset",
    "node_shard",
    "partition_indices",
]
