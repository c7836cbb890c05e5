"""Errors meant for people.

Every mistake a user can make (a missing model, a corrupt file, a prompt that is too long, a bad
flag) raises a subclass of `MinferError` whose message is one sentence saying what is wrong and what
to do. The CLI prints that sentence and exits non-zero; it never shows a traceback for these.
"""


class MinferError(Exception):
    """Base class: the message is shown to the user as it is."""


class ModelNotFoundError(MinferError):
    """The model path does not exist or holds no model."""


class ModelFormatError(MinferError):
    """The model file is corrupt, truncated or not in a format minfer reads."""


class UnsupportedModelError(MinferError):
    """The model is readable but its architecture (or a tensor type) is not supported."""


class FetchError(MinferError):
    """The default model could not be downloaded or verified."""


class PromptTooLongError(MinferError):
    """The prompt (plus what should be generated) does not fit in the model's context."""


class InvalidArgumentError(MinferError, ValueError):
    """A parameter or flag has a value that makes no sense."""


class BackendUnavailableError(MinferError):
    """The requested compute backend cannot run on this machine."""


class NonFiniteError(MinferError):
    """A forward pass produced NaN or infinity: the weights (or the kernels) are broken."""


def check_finite(array, stage: str) -> None:
    """Raise NonFiniteError naming `stage` when `array` holds a NaN or an infinity.

    Meant to run once per step on what leaves the model (e.g. the logits rows that will be
    sampled), outside any compiled region: a NaN anywhere upstream reaches the logits, so one
    check there catches it for the cost of one pass over [rows, vocab]."""
    import numpy as np

    a = np.asarray(array)
    ok = np.isfinite(a)
    if not ok.all():
        bad = int(a.size - np.count_nonzero(ok))
        raise NonFiniteError(
            f"the {stage} produced {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf) "
            f"out of {a.size}; the model's weights are probably corrupt (check the file, or try "
            f"--backend numpy to tell a kernel bug from bad weights)")
