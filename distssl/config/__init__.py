"""The run's configuration: the typed tree (tree.py), how a YAML file and ``key=value`` overrides
become one (coerce.py), and the recipes and DeepSpeed templates that ship in the package (recipes/)."""
from distssl.config.coerce import ConfigError
from distssl.config.tree import (
                                 ALGORITHM_NAMES,
                                 Config,
                                 SSLConfig,
                                 check_paths,
                                 data_sources,
                                 dump_yaml,
                                 load_config,
                                 redacted_dict,
                                 resume_conflicts,
                                 to_dict,
                                 validate,
)

__all__ = ["ALGORITHM_NAMES", "Config", "ConfigError", "SSLConfig", "check_paths", "data_sources", "dump_yaml",
           "load_config", "redacted_dict", "resume_conflicts", "to_dict", "validate"]
