"""p2pfl: decentralized peer-to-peer federated learning with no server."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
