"""TensorBoard scalars written synchronously, never at the cost of the run.

tensorboardX's ``SummaryWriter`` writes from a background thread fed by a bounded queue: when
that thread's write fails (a full disk, a vanished directory) it dies, the queue fills, and
the next ``add_scalar`` blocks forever — a run that hangs instead of reporting its real error.
:class:`Summaries` writes the same event files from the calling thread (tensorboardX's
``EventsWriter``; a scalar is a few dozen bytes, written a few times per minute): the first
``OSError`` is logged once and turns the summaries off, and the run goes on to meet, and
report, the error itself (e.g. at its next checkpoint).
"""

from __future__ import annotations

import os
import time

from absl import logging


class Summaries:
    """Scalars of one run in ``logdir`` (created on the first write)."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._writer = None
        self._failed = False

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Appends one scalar event (nothing once a write has failed)."""
        self._guarded(self._write, tag, float(value), int(step))

    def flush(self) -> None:
        """Pushes the written events to the file system."""
        if self._writer is not None:
            self._guarded(self._writer.flush)

    def close(self) -> None:
        """Flushes and closes the event file; safe to call twice."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            if not self._failed:
                try:
                    writer.close()
                except OSError as e:
                    self._fail(e)

    def _write(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        if self._writer is None:
            os.makedirs(self.logdir, exist_ok=True)
            self._writer = EventsWriter(os.path.join(self.logdir, "events"))
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=scalar(tag, value))
        self._writer.write_event(event)

    def _guarded(self, fn, *args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except OSError as e:
            self._fail(e)

    def _fail(self, error: OSError) -> None:
        self._failed = True
        logging.warning("TensorBoard summaries in %s stopped: %s", self.logdir, error)
