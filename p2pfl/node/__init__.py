"""One p2pfl node, split by job (see docs/architecture.md, "Layers").

`daemon` wires everything and applies the round machine's actions; `Node` and the file
names and limits that tests and tools refer to are re-exported here, so
`from p2pfl.node import Node` stays the one way in.
"""

from p2pfl.node.daemon import CONTROL_SOCKET, STATE_REPLY_EVERY, Node
from p2pfl.node.learner import CHECKPOINT_FILE, METRICS_FILE

__all__ = ["CHECKPOINT_FILE", "CONTROL_SOCKET", "METRICS_FILE", "STATE_REPLY_EVERY", "Node"]
