"""HTTP: the app that wires the gateway, the predict fast path, the error builder, the body cap."""
