import typer

app = typer.Typer(
    name="steptune",
    help="Train small LLM agents that catch and repair their own mistakes (STeP).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # the docstrings are wrapped at 120 columns: rich markup kept their line breaks in the command list and wrapped
    # again at the terminal's width, and read "[...]" as markup (`pip install 'steptune[ray]'` showed as 'steptune')
    rich_markup_mode="markdown",
)


@app.command()
def version() -> None:
    """Print the steptune version."""
    from steptune import __version__

    print(__version__)
