"""One typed config: its schema (each stage's choice types imported from their owners) and how a YAML file, keyword fields and key=value overrides become one."""
