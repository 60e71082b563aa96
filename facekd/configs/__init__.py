"""Ready YAML configs shipped with facekd (also reachable as configs/ in the repository)."""
