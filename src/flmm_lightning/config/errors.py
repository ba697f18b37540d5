"""The error every configuration check raises."""


class ConfigError(ValueError):
    """A config value that cannot work (names the config key)."""
