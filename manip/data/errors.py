class DatasetError(ValueError):
    """A dataset file or key is missing or malformed; the message names the file and the key."""
