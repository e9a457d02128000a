"""The command line: argument parsing that calls the Python API, and exit codes."""
