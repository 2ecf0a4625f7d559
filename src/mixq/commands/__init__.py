"""One module per ``mixq`` sub-command (see ``mixq.cli``)."""
