"""`python -m tagscale.demo`: the command line of tagscale.study.demo, kept at the top so the documented command
stays short."""

from tagscale.study.demo import cli, main  # noqa: F401  (re-exported for `-m` and console scripts)

if __name__ == "__main__":
    cli()
