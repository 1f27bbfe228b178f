"""The ``moespeq`` command line: app.py wires one module per command (its options, help
epilog and output); options.py defines the options they share; errors.py maps every
failure to one line on stderr and an exit code (2 usage, 1 runtime); render.py draws
tables and the stats line. Each command imports torch inside its function, so ``--help``
answers at once."""
