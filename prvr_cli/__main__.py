from .cli.commands_tmp import run

run()
