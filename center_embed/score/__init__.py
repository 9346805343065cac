"""Batch scoring: images in, one row per image out (Parquet or .npy); never imports torch.

sources  what to score: a folder, a list of paths, a CIFAR-10 archive (lazy, ordered)
decode   a batch of images decoded, one error per image that fails: both engines use it
output   the row schema and the part files that make resuming exact
local    the in-process engine: decode and run in a thread pool, write in order
ray      the Ray Data engine (score_on_ray, the ScoreBatches actor): the same rows as a
         Parquet dataset, from one machine to a cluster; ray is imported only inside
         functions (the optional extra `ray`)
"""
