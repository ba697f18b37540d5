"""Configuration: composing Hydra configs and their resolvers (``composition``), the config a checkpoint
stores and the schema it is checked against (``stored``), the data config's schema (``data_schema``) and the
settings a person may choose (``settings``)."""
