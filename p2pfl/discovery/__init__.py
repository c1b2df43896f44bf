"""Finding peers on the local link with mDNS (see docs/discovery.md).

- `mdns`: `run_mdns` announces this node and reports others (zeroconf bridged into trio);
  `default_interfaces` picks IPv4 interfaces from the listen address.
- `txt`: sans-IO parsing of the untrusted service records (a peer id is only a claim).
- `probe`: a tiny zeroconf-independent mDNS query, to check what we publish.
- `netns`: throwaway bridged network namespaces for multi-host tests and benchmarks.

Static bootstrap addresses and peer exchange live in the node and membership table;
this package only adds addresses to dial, it never decides whom to trust.
"""
