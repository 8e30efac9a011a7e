"""Config loading: defaults < YAML recipe < CLI overrides, strict keys, resolved config dump."""

from largessl.config.load import RECIPES_DIR, dump_config, list_recipes, load_config
from largessl.config.schema import PretrainConfig

__all__ = ["RECIPES_DIR", "PretrainConfig", "dump_config", "list_recipes", "load_config"]
