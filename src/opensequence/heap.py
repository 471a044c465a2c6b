"""Process start-up hygiene for the long-running commands (``serve``, ``api``, ``worker``)."""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect once, then move every object alive now (imported modules, the app with its
    routes, schemas and templates) into the collector's permanent generation.

    Without this every full collection walks those ~165,000 start-up objects again: a
    10,000-item add-contacts request allocates enough to trigger one about every other request,
    which measured 0.16 s each; after ``freeze`` the same collection takes ~0.02 s.
    """
    gc.collect()
    gc.freeze()
