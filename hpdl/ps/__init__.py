"""Parameter-server ranks: the wire format, the server loop, the worker's client, and the sharding of stages."""
