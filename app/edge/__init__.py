"""The edge every transport shares: who calls (keys, callers), what they may call, request ids,
the access log and the service object the transports serve from."""
