"""Benchmarks: the rendezvous gateway against in-process serving and MLServer."""
