"""vdsmlite: a host-side storage agent speaking VDSM's JSON-RPC dialect."""

__version__ = "0.1.0"
