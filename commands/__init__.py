"""One module per `lorafit` command: thin glue that builds a backend, a model and the core
objects, and prints what the command prints. `cli.py` parses the flags and calls these."""
