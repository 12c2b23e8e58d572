"""The rendezvous vocabulary: stream names, envelopes, the schedule, divergence, the matcher.

This package knows nothing of FastAPI or of how processes are started; the gateway wires it.
"""
