"""The command lines (design §4): tcpcopy-mp's CLI, its arguments, the schema -> flags/TOML
mapping both programs use, the config reference generator and the doctor."""
