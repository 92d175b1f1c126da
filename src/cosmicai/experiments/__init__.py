"""Experiments that run work: ``bench`` (the original's grid of data sizes x partitions x batches), on a runner."""
