from msgsnn.cli import app

app(prog_name="msgsnn")
