"""Turn image collections into largessl shard datasets (shard-format.md)."""
