"""Benchmarks of d2prune: speed-up per FLOPs cut, surgery, scoring overhead, memory, peers."""
