"""Per-domain policies: actions, the compiled policy (verdict -> level -> action), the YAML loader and live store."""
