"""`orderbook db`: create the database and apply migrations (the first step of every fresh environment)."""

from __future__ import annotations

import typer

from orderbook_pipelines.cli.common import database_url

app = typer.Typer(no_args_is_help=True, help="Database: create and migrate.")


@app.command("init")
def db_init(reset: bool = typer.Option(False, help="drop the database first (dev chains start empty)")) -> None:
    """Create the database named in DATABASE_URL if missing, then apply pending migrations."""
    from orderbook_pipelines.storage.db import drop_database, ensure_database, migrate

    url = database_url()
    if reset:
        drop_database(url)
    created = ensure_database(url)
    applied = migrate(url)
    typer.echo(f"database {'created' if created else 'exists'}; migrations applied: {applied or 'none pending'}")
