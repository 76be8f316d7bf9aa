from epcwatch.cli import app

app()
