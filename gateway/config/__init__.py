"""Configuration: YAML in, frozen dataclasses out.

The rules of its shape live in :mod:`.model` (what each section holds and its ranges);
:mod:`.yamlfile` reads YAML with line numbers and ``${ENV}`` substitution;
:mod:`.builder` types plain values into the dataclasses; :mod:`.loader` checks the rules
that span sections and makes relative paths the config file's; :mod:`.display` prints a
config with its secrets masked.
"""

from gateway.config.display import dump_config, to_plain
from gateway.config.loader import (
    build_config,
    exposure_problem,
    is_loopback,
    load_config,
    parse_config,
    read_config,
    resolve_paths,
)
from gateway.config.model import (
    DEFAULT_CONFIG_ENV,
    DEFAULT_YAML,
    RESERVED_USER_NAMES,
    SIZES,
    USER_NAME,
    AbuseConfig,
    ApiConfig,
    AuditConfig,
    AuthConfig,
    BackendConfig,
    BreakerConfig,
    CacheConfig,
    Config,
    ConfigError,
    ImagesConfig,
    LoggingConfig,
    MetricsConfig,
    QuotaLimits,
    RetryConfig,
    ServerConfig,
    StateConfig,
    TokenPrices,
    UserConfig,
)
from gateway.config.yamlfile import env_names

__all__ = [
    "DEFAULT_CONFIG_ENV",
    "DEFAULT_YAML",
    "RESERVED_USER_NAMES",
    "SIZES",
    "USER_NAME",
    "AbuseConfig",
    "ApiConfig",
    "AuditConfig",
    "AuthConfig",
    "BackendConfig",
    "BreakerConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "ImagesConfig",
    "LoggingConfig",
    "MetricsConfig",
    "QuotaLimits",
    "RetryConfig",
    "ServerConfig",
    "StateConfig",
    "TokenPrices",
    "UserConfig",
    "build_config",
    "dump_config",
    "env_names",
    "exposure_problem",
    "is_loopback",
    "load_config",
    "parse_config",
    "read_config", "resolve_paths",
    "to_plain",
]
