class ModelError(Exception):
    """A problem with the user's input (file, dataset, option): printed as one line, exit 1."""
