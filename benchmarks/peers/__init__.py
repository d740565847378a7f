"""Side by side with the servers users would pick instead: ``python -m benchmarks.peers``.

One file per peer, each a server on its own, run from the separate ``.venv-peers``
(``make peers-venv``); ``common`` is all they share with each other and with ``app/``.
"""
