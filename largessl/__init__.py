"""largessl: self-supervised ViT pretraining on DeepSpeed ZeRO, streamed from webdataset shards, tracked in MLflow."""

__version__ = "0.1.0"
