class DatasetError(ValueError):
    """A dataset file or key is missing or malformed; the message names the file and the key."""


def check_action_range(path, key: str, actions, bound: float = 1.0, tolerance: float = 1e-3) -> None:
    """Raise DatasetError naming ``key`` when an action lies outside ``[-bound, bound]`` by more than ``tolerance``.

    Robomimic and OGBench store actions normalised to [-1, 1] (the simulators' action spaces), and loaders clip
    them to just inside it; a file with raw, unnormalised actions would be clipped out of recognition instead.
    """
    import numpy as np

    outside = np.abs(actions) > bound + tolerance
    if outside.any():
        row = int(np.argwhere(outside)[0][0])
        raise DatasetError(
            f"{path}: {key} holds actions outside [-{bound:g}, {bound:g}] (max |a| = {float(np.abs(actions).max()):.4g}, "
            f"{int(outside.any(axis=-1).sum())} rows, first row {row}); the simulators take normalised actions"
        )
