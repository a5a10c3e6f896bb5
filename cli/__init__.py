"""The `kdcache` command line: a thin Typer front end over kdcache's recipes (shipped as kdcache.cli)."""
