"""`python -m kdcache ...`: the console script, for launchers that take a module (`torchrun -m kdcache distill`)."""

from kdcache.cli.main import main

if __name__ == "__main__":
    main()
