"""The Python API: what the command line does, as functions that take values and give values
back, raise SftforgeError subclasses instead of exiting, and print only when asked
(`verbose=True`). `import sftforge` re-exports it."""
