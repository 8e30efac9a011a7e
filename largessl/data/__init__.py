"""Streaming shard datasets (shard-format.md) into training and evaluation batches.

`config` and `index` are torch-free (a config and its datasets are checked before torch is imported);
`build` makes the DataLoaders.
"""
