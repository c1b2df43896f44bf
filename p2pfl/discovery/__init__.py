"""Finding peers: mDNS on the local link (`mdns`), with untrusted TXT claims (`txt`).

Static bootstrap addresses and peer exchange live in the node and membership table;
this package only adds addresses to dial, it never decides whom to trust.
"""
