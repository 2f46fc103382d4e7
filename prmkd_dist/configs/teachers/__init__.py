"""Teacher configs (YAML) for `prmkd-dist teachers train|pipeline` (prmkd_dist.teachers.pipeline)."""
