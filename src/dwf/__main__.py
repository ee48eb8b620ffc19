from dwf.cli import app

app()
