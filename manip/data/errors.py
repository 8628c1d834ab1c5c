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


# Generated stand-in datasets carry this marker (an HDF5 ``data`` attribute / an npz array holding a JSON object:
# generator, task or dataset, size, seed); the released files lack it. Readers of either format ignore it.
GENERATED_MARKER = "manip_generated"


def generated_description(marker) -> dict | None:
    """The parsed marker of a generated file (None for a released one, or an unreadable marker)."""
    import json

    if marker is None:
        return None
    try:
        value = json.loads(marker.item() if hasattr(marker, "item") else marker)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
