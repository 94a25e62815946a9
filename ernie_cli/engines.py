"""Which engine answers: the embedded model (`engine.TorchEngine`) or a server (`remote.RemoteEngine`)."""

from __future__ import annotations


def make_engine(server: str | None = None):
    """With `server` (an OpenAI-compatible URL, from --server) a client of that server, else the local model."""
    if server:
        from ernie_cli.remote import RemoteEngine

        return RemoteEngine()
    from ernie_cli.engine import make_engine as local

    return local()
