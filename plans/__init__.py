"""Built-in tensor-parallel plans, one TOML file per architecture family (data, not code)."""
