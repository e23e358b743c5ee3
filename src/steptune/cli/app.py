import typer

app = typer.Typer(
    name="steptune",
    help="Train small LLM agents that catch and repair their own mistakes (STeP).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.command()
def version() -> None:
    """Print the steptune version."""
    from steptune import __version__

    print(__version__)
