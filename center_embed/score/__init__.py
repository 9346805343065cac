"""Batch scoring: images in, one row per image out (Parquet or .npy); never imports torch.

sources  what to score: a folder, a list of paths, a CIFAR-10 archive (lazy, ordered)
output   the row schema and the part files that make resuming exact
local    the in-process engine: decode and run in a thread pool, write in order
"""
