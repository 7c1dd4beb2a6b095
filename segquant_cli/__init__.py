"""The ``segquant`` command line: thin wrappers that parse, call the public APIs and print."""
