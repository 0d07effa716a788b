"""The controller's one base error, and the kinds built on it."""


class FairsynergyError(Exception):
    """Base of every error the controller raises on purpose.

    The command line turns these into a one-line message and a non-zero exit;
    anything else is a bug.
    """
