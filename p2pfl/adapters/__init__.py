"""Adapters that wrap models from other frameworks as a p2pfl `Model`.

Each adapter lives in its own module and imports its framework there, so importing
`p2pfl` or this package never loads a framework nobody asked for:

* `p2pfl.adapters.torch.TorchModel` -- PyTorch (`pip install 'p2pfl[torch]'`).
"""
