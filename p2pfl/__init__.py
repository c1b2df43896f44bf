"""p2pfl: decentralized peer-to-peer federated learning with no server.

The public Python API (docs/api.md):

* `run_node(config, model=..., data=...)` runs a node until its rounds are done and
  returns its history; `open_node(...)` is the same for a program that runs trio;
* `Node`, `NodeConfig`, the `Model` protocol and `Dataset` are the pieces they use;
* `ConfigError` (bad configuration, model or data) and `FatalError` (a local condition
  such as a port in use or a full disk) are what they raise.

The names are loaded on first use (PEP 562): `import p2pfl` stays stdlib-only, so
`p2pfl status` and `p2pfl --help` never pay for trio, numpy or cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
PROTOCOL_VERSION = 3

if TYPE_CHECKING:
    from p2pfl.api import open_node, run_node
    from p2pfl.config import ConfigError, NodeConfig
    from p2pfl.fatal import FatalError
    from p2pfl.learning.datasets import Dataset
    from p2pfl.learning.model import Model
    from p2pfl.node import Node

_LAZY = {
    "ConfigError": "p2pfl.config",
    "Dataset": "p2pfl.learning.datasets",
    "FatalError": "p2pfl.fatal",
    "Model": "p2pfl.learning.model",
    "Node": "p2pfl.node",
    "NodeConfig": "p2pfl.config",
    "open_node": "p2pfl.api",
    "run_node": "p2pfl.api",
}

__all__ = [
    "PROTOCOL_VERSION",
    "ConfigError",
    "Dataset",
    "FatalError",
    "Model",
    "Node",
    "NodeConfig",
    "__version__",
    "open_node",
    "run_node",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pfl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
