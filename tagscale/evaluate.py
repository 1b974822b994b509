"""`python -m tagscale.evaluate`: the command line of tagscale.eval.evaluate, kept at the top so the documented command
stays short."""

from tagscale.eval.evaluate import cli, main  # noqa: F401  (re-exported for `-m` and console scripts)

if __name__ == "__main__":
    cli()
