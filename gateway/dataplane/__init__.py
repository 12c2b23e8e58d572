"""The data plane: one ``predict`` call that every transport uses, its validation, and the
rendezvous that matches answers to requests."""
