"""The package's own exception, and its warnings (attributed to the user's code)."""


class MergeError(ValueError):
    """Inputs that cannot be merged (mismatched keys, shapes, dtypes, architectures, non-finite values)."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first caller outside the hf_merge package."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
