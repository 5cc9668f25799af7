"""The package's own exception."""


class MergeError(ValueError):
    """Inputs that cannot be merged (mismatched keys, shapes, dtypes, architectures, non-finite values)."""
