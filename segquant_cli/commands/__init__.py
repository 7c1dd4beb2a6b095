"""One module per ``segquant`` subcommand; each exposes ``add_parser(subparsers)`` and ``run(args)``."""
