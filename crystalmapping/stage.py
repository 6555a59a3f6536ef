"""Stage: the base of the tutorial's callbacks, one input run -> one derived run.

:class:`Stage` is an :class:`event_model.DocumentRouter` (it takes ``event``
and ``event_page`` documents alike) that keeps a state per input run (runs may
interleave), sends the documents it emits to its subscribers, and opens and
closes the derived run: its start document records ``analysis_stage``,
``parent_uid``, ``source_uid``, the grid (:data:`GRID_KEYS`) and the
``analysis_parameters``; its stop says ``exit_status="fail"`` when processing
the run raised. The callbacks of :mod:`crystalmapping.callbacks` fill in
``_on_descriptor``, ``_on_event`` and ``_on_stop``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Mapping

import numpy as np
from event_model import DocumentRouter, compose_run

from .errors import ConfigTypeError, ScanError

__all__ = ["Stage", "RunState", "DocumentCallback", "GRID_KEYS", "python_scalar", "filter_hints"]

logger = logging.getLogger(__name__)

#: Start-document keys of the scan grid, copied from a run to the runs derived from it.
GRID_KEYS = ("shape", "extents", "snaking", "motors", "num_points")
#: Other start-document keys copied along when present (``BestEffortCallback``'s
#: summary line reads ``plan_type``, ``plan_name`` and ``scan_id``).
_COPIED_KEYS = GRID_KEYS + ("scan_id", "plan_type", "plan_name", "sample")

DocumentCallback = Callable[[str, dict], Any]


def python_scalar(value):
    """A numpy scalar as the Python number it holds (documents stay JSON/msgpack-ready)."""
    return value.item() if isinstance(value, np.generic) else value


def filter_hints(hints: Mapping | None, keys) -> dict:
    """Descriptor hints restricted to the fields that are still there."""
    out = {}
    for obj, value in dict(hints or {}).items():
        if isinstance(value, Mapping) and "fields" in value:
            fields = [f for f in value["fields"] if f in keys]
            if fields:
                out[obj] = {**value, "fields": fields}
    return out


@dataclasses.dataclass
class RunState:
    """What a callback knows about one input run while it is open."""

    parent: dict
    bundle: Any  # event_model.ComposeRunBundle of the derived run
    descriptors: dict = dataclasses.field(default_factory=dict)  # input uid -> output bundle
    n_events: int = 0
    n_out: int = 0
    n_empty: int = 0
    rows: list = dataclasses.field(default_factory=list)
    keys: list | None = None
    error: str | None = None  # the first error raised while processing this run

    @contextlib.contextmanager
    def failing(self):
        """Record the first error raised inside (and raise it): the derived run then fails."""
        try:
            yield
        except Exception as exc:
            if self.error is None:
                self.error = repr(exc)
            raise


class Stage(DocumentRouter):
    """Base of the callbacks: subscriptions, per-run state, the derived run's start and stop.

    Parameters
    ----------
    stream : str
        The stream to process; documents of other streams are ignored.
    """

    #: The ``analysis_stage`` recorded in the derived run's start document.
    analysis_stage = "stage"

    def __init__(self, *, stream: str = "primary"):
        super().__init__()
        if not isinstance(stream, str) or not stream:
            raise ConfigTypeError(
                f"stream must be a stream name such as 'primary', got {stream!r}.")
        self.stream = stream
        self._callbacks: list[DocumentCallback] = []
        self._runs: dict[str, RunState] = {}
        self._run_of_descriptor: dict[str, str] = {}  # every descriptor uid -> its run
        self._warned_unknown: set[str] = set()

    # -- subscriptions --------------------------------------------------------------

    def subscribe(self, callback: DocumentCallback) -> DocumentCallback:
        """Send every document this callback emits to ``callback(name, doc)``.

        Returns ``callback``, so chains read left to right:
        ``ip.subscribe(pt).subscribe(tl)``. References are strong (a lambda
        stays subscribed).
        """
        if not callable(callback):
            raise ConfigTypeError(
                f"subscribe takes a callable f(name, doc), e.g. another callback or "
                f"catalog.insert; got {callback!r}."
            )
        self._callbacks.append(callback)
        return callback

    def unsubscribe(self, callback: DocumentCallback) -> None:
        """Stop sending documents to ``callback``."""
        self._callbacks = [cb for cb in self._callbacks if cb is not callback and cb != callback]

    def emit(self, name: str, doc: dict) -> None:
        """Send one derived document to the subscribers, in subscription order."""
        for callback in list(self._callbacks):
            callback(name, doc)

    # -- derived run ----------------------------------------------------------------

    def _parameters(self) -> dict:
        return {}

    def start(self, doc):
        parent_uid = doc["uid"]
        metadata = {k: doc[k] for k in _COPIED_KEYS if k in doc}
        metadata.update(
            analysis_stage=self.analysis_stage,
            parent_uid=parent_uid,
            source_uid=doc.get("source_uid", parent_uid),
            analysis_parameters=self._parameters(),
        )
        metadata.update(self._extra_start_metadata(doc))
        bundle = compose_run(metadata=metadata)
        self._runs[parent_uid] = RunState(parent=dict(doc), bundle=bundle)
        self.emit("start", bundle.start_doc)

    def _extra_start_metadata(self, doc) -> dict:
        return {}

    def _warn_unknown(self, what: str) -> None:
        if what not in self._warned_unknown:
            self._warned_unknown.add(what)
            logger.warning("%s: ignoring documents of %s, whose start document it did not "
                           "receive (subscribed mid-run?)", self.analysis_stage, what)

    def descriptor(self, doc):
        state = self._runs.get(doc["run_start"])
        if state is None:
            self._warn_unknown(f"run {doc['run_start'][:8]}")
            return
        self._run_of_descriptor[doc["uid"]] = doc["run_start"]
        if doc.get("name") != self.stream:
            return  # another stream (baseline...): its events are ignored
        with state.failing():
            state.descriptors[doc["uid"]] = self._on_descriptor(state, doc)

    def _on_descriptor(self, state: RunState, doc: dict):
        raise NotImplementedError

    def event(self, doc):
        run_start = self._run_of_descriptor.get(doc["descriptor"])
        if run_start is None:
            self._warn_unknown(f"descriptor {doc['descriptor'][:8]}")
            return
        state = self._runs[run_start]
        out = state.descriptors.get(doc["descriptor"])
        if out is None:
            return  # a stream this callback ignores, or a descriptor it refused
        state.n_events += 1
        with state.failing():
            self._on_event(state, out, doc)

    def _on_event(self, state: RunState, out, doc: dict) -> None:
        raise NotImplementedError

    def stop(self, doc):
        state = self._runs.pop(doc["run_start"], None)
        if state is None:
            return
        for uid in [u for u, r in self._run_of_descriptor.items() if r == doc["run_start"]]:
            del self._run_of_descriptor[uid]
        try:
            with state.failing():
                if state.error is None:
                    self._on_stop(state, doc)
        finally:
            if state.error is not None:
                self._emit_stop(state, doc, exit_status="fail",
                                reason=f"{self.analysis_stage} failed: {state.error}")
            else:
                self._emit_stop(state, doc)

    def _on_stop(self, state: RunState, doc: dict) -> None:
        pass

    def _emit_stop(self, state: RunState, doc: dict, exit_status: str | None = None,
                   reason: str | None = None) -> None:
        status = exit_status or doc.get("exit_status", "success")
        if reason is None:
            reason = doc.get("reason", "") or ""
        self.emit("stop", state.bundle.compose_stop(exit_status=status, reason=reason))

    # -- helpers ------------------------------------------------------------------

    def _require_key(self, doc: dict, key: str, hint: str) -> dict:
        data_keys = doc.get("data_keys", {})
        if key not in data_keys:
            raise ScanError(
                f"{self.analysis_stage}: data key {key!r} is not in the {doc.get('name')!r} "
                f"stream of run {doc.get('run_start', '?')[:8]}; its data keys are "
                f"{sorted(data_keys)}. {hint}"
            )
        return data_keys[key]
