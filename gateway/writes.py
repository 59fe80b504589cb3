"""What ``/readyz`` knows of the stores' recent writes."""

from __future__ import annotations

from gateway.errors import StorageUnavailable


class WriteHealth:
    """Which stores' last writes failed (a full disk, a read-only or locked file,
    Redis away): ``/readyz`` names them and is not ready until a write succeeds again.

    A read-only check cannot see a full disk (reads still work, ``os.access`` still says
    writable), so the outcome of the writes requests make is what tells."""

    def __init__(self) -> None:
        self._failing: dict[str, str] = {}

    def report(self, store: str, error: BaseException | None) -> None:
        if error is None:
            self._failing.pop(store, None)
        else:
            # The kind only (as the state check shows it): the detail, with its paths,
            # is in the log line of the write that failed.
            self._failing[store] = (error.kind if isinstance(error, StorageUnavailable)
                                    else type(error).__name__)

    def failing(self) -> dict[str, str]:
        return dict(self._failing)
