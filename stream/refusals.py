"""The refusal-storm guard: tells an API incident (it suddenly refuses most of what it is sent: a bad deploy,
a new undocumented rule, a proxy answering 400) from a rare bad batch. Pure: time is passed in as `now`.

Every sample `stream` sends has passed every rule the API documents, so a refusal is either rare bad data
or the API gone wrong. Dead-lettering is right for the first and ruinous for the second (a whole topic
drained into the DLQ in minutes), so the guard weighs the evidence: every batch the API answered for good
(200, 207, 400/413/422), with how many samples it had and how many the API refused (a 400/413/422: all; a
207: its listed part; a 207 whose list cannot be read: all). A batch counts once: its re-sends are not new
evidence. Evidence is kept for `window` seconds.

A *suspect* is an answer that refused more than `share` of its batch. What comes AFTER a suspect decides what
it was; answers from before it say nothing about it (the API may have broken a second ago, after a minute
of accepting everything):

- at least `min_batches` other batches answered after it (within `window`) and more than `share` of their
  samples refused: an API incident. The guard trips (a storm).
- at least `min_batches` other batches answered after it and at most `share` of their samples refused: the
  API works; the suspect is bad data (isolated), to be dead-lettered.
- fewer than `min_batches` within a whole `window` after it: too little traffic to tell; treated as
  isolated, so a lone bad batch in a quiet system still reaches the DLQ (one window late), never loops.

The trip is checked on the other batches only, not the suspect's own samples: one big bad batch (1000
samples) among a few small accepted ones must not look like a storm.

While tripped, the first answer that refuses at most `share` of its batch (a probe accepted, or accepted
but for a few samples) ends the storm, and all evidence is forgotten (`reset_at`): the batches held during
the storm go out again and are judged afresh.

`verdict(batch, since, now)` is how a refused batch learns its fate: HOLD (keep it, send it again later) or
DEAD_LETTER. With the guard off every refusal is dead-lettered at once, as before the guard existed.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass


class Verdict(enum.Enum):
    HOLD = "hold"  # an incident, or not known yet: keep the batch and send it again later
    DEAD_LETTER = "dead_letter"  # isolated: the API works and refuses this batch


class Change(enum.Enum):
    TRIPPED = "tripped"
    ENDED = "ended"


@dataclass(slots=True)
class _Suspect:
    at: float
    batch: Hashable
    # Running totals (batches, samples, refused samples) right after the suspect's own answer: what
    # came after it is the totals now minus these.
    batches: int
    samples: int
    refused: int


class RefusalGuard:
    def __init__(self, window: float, min_batches: int, share: float, enabled: bool = True) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        if min_batches < 1:
            raise ValueError("min_batches must be >= 1")
        if not 0 < share < 1:
            raise ValueError("share must be within (0, 1)")
        self.window = window
        self.min_batches = min_batches
        self.share = share
        self.enabled = enabled
        self.tripped = False
        self.tripped_at: float | None = None
        self.reset_at = float("-inf")  # when the evidence was last forgotten (the end of a storm)
        self.storms = 0  # storms so far (for tests and logs)
        # Evidence: the first answer of each batch within the window, oldest first, with running sums.
        self._answers: deque[tuple[float, Hashable, int, int]] = deque()
        self._seen: dict[Hashable, float] = {}  # batch -> when its first answer in the window came
        self._window_samples = 0
        self._window_refused = 0
        # Running totals since the last reset (never decrease: suspects keep a snapshot of them).
        self._batches = 0
        self._samples = 0
        self._refused = 0
        self._suspects: deque[_Suspect] = deque()  # oldest first
        self._suspect_of: dict[Hashable, _Suspect] = {}
        self._suspect_at: dict[int, _Suspect] = {}  # running batch count right after it -> the suspect

    # -- evidence ---------------------------------------------------------------------------------------

    def refuses_most(self, samples: int, refused: int) -> bool:
        """An answer that refused more than `share` of its batch (a suspect; while tripped, a failed probe)."""
        return refused > self.share * max(1, samples)

    def answered(self, batch: Hashable, samples: int, refused: int, now: float) -> Change | None:
        """The API answered `batch` (of `samples` samples) for good, refusing `refused` of them. Returns
        TRIPPED or ENDED when this answer started or ended a storm."""
        if not self.enabled:
            return None
        refused = max(0, min(refused, samples))
        if self.tripped:
            if self.refuses_most(samples, refused):
                self._expire(now)
                self._count(batch, samples, refused, now)  # for the gauge; the storm goes on
                return None
            self._end(now)
            return Change.ENDED
        self._expire(now)
        if not self._count(batch, samples, refused, now):
            return None  # a re-send of a batch already counted: no new evidence
        self._batches += 1
        self._samples += samples
        self._refused += refused
        if self.refuses_most(samples, refused):
            suspect = _Suspect(now, batch, self._batches, self._samples, self._refused)
            self._suspects.append(suspect)
            self._suspect_of[batch] = suspect
            self._suspect_at[self._batches] = suspect
        if self._storm_evident(refused):
            self.tripped = True
            self.tripped_at = now
            self.storms += 1
            return Change.TRIPPED
        return None

    def verdict(self, batch: Hashable, since: float, now: float) -> Verdict:
        """The fate of `batch`, which the API refused (most of it) first at `since` (since the last storm)."""
        if not self.enabled:
            return Verdict.DEAD_LETTER
        if self.tripped or since < self.reset_at:
            return Verdict.HOLD  # an incident; or refused before the evidence was reset: to be judged afresh
        self._expire(now)
        suspect = self._suspect_of.get(batch)
        if suspect is not None:
            after, samples, refused = self._after(suspect)
            if after >= self.min_batches:
                # More than `share` refused would have tripped the guard: the API works, this batch is bad.
                return Verdict.DEAD_LETTER if refused <= self.share * samples else Verdict.HOLD
        if now - since >= self.window:
            return Verdict.DEAD_LETTER  # a whole window without enough traffic to tell: not an incident we can see
        return Verdict.HOLD

    # -- what the gauges show -----------------------------------------------------------------------

    def window_share(self, now: float | None = None) -> float:
        """Share of samples refused among those answered in the window (first answer of each batch)."""
        if now is not None:
            self._expire(now)
        return self._window_refused / self._window_samples if self._window_samples else 0.0

    def window_batches(self, now: float | None = None) -> int:
        if now is not None:
            self._expire(now)
        return len(self._answers)

    # -- internals ----------------------------------------------------------------------------------

    def _count(self, batch: Hashable, samples: int, refused: int, now: float) -> bool:
        """Add a batch's first answer in the window to it; False for a batch already there (a re-send)."""
        if batch in self._seen:
            return False
        self._seen[batch] = now
        self._answers.append((now, batch, samples, refused))
        self._window_samples += samples
        self._window_refused += refused
        return True

    def _after(self, suspect: _Suspect) -> tuple[int, int, int]:
        """(batches, samples, refused samples) answered after the suspect."""
        return self._batches - suspect.batches, self._samples - suspect.samples, self._refused - suspect.refused

    def _storm_evident(self, refused_now: int) -> bool:
        """Does some suspect have at least `min_batches` batches after it, refusing more than `share`?

        An answer that refused nothing lowered every suspect's share and brought at most one to the minimum
        (the one exactly `min_batches` batches back): only that one needs a look, so accepted batches cost
        O(1) however many suspects there are. Suspects are oldest first, so the number of batches after each
        only decreases along the queue: only a prefix has enough.
        """
        if refused_now == 0:
            suspect = self._suspect_at.get(self._batches - self.min_batches)
            return suspect is not None and self._refuses_most_after(suspect)
        for suspect in self._suspects:
            if self._batches - suspect.batches < self.min_batches:
                return False
            if self._refuses_most_after(suspect):
                return True
        return False

    def _refuses_most_after(self, suspect: _Suspect) -> bool:
        _, samples, refused = self._after(suspect)
        return refused > self.share * samples

    def _expire(self, now: float) -> None:
        oldest = now - self.window
        answers = self._answers
        while answers and answers[0][0] < oldest:
            at, batch, samples, refused = answers.popleft()
            self._window_samples -= samples
            self._window_refused -= refused
            if self._seen.get(batch) == at:
                del self._seen[batch]
        suspects = self._suspects
        while suspects and suspects[0].at < oldest:
            suspect = suspects.popleft()
            if self._suspect_of.get(suspect.batch) is suspect:
                del self._suspect_of[suspect.batch]
            del self._suspect_at[suspect.batches]

    def _end(self, now: float) -> None:
        """A probe went through: the storm is over; forget the evidence, judge what follows afresh."""
        self.tripped = False
        self.tripped_at = None
        self.reset_at = now
        self._answers.clear()
        self._seen.clear()
        self._window_samples = self._window_refused = 0
        self._suspects.clear()
        self._suspect_of.clear()
        self._suspect_at.clear()
