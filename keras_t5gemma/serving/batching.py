"""Dynamic batching: rows that arrive within a few milliseconds decode together, in bucketed shapes.

One worker thread per loaded model takes up to `max_batch_size` queued rows,
pads them to a bucketed shape (batch size, encoder length, image slots,
decoder cache length: each rounded up to the next bucket, so that after
warm-up no batch compiles anything new), starts the batch once and steps it
one token at a time. Every row streams its own text pieces, samples with its
own settings and random generator, and leaves the batch as soon as it stops,
is cancelled (its client left) or runs out of time; the batch ends when its
last row does. A bounded queue refuses rows beyond `max_queue` (the server
answers 429 with `Retry-After`).

Clients in a closed loop (each sends its next request when answered) come
back together, since a batch answers its rows at the same step; a batch
started on the first of them would leave the rest queued for a whole batch,
so batches would alternate between a few rows and the rest. Right after a
batch of several rows, the worker therefore waits for as many rows as that
batch had (plus those already queued), for at most `companion_wait` times
that batch's decode time.
"""

import collections
import math
import threading
import time
from dataclasses import dataclass
from dataclasses import field

import numpy as np

from keras_t5gemma.models.streaming import IncrementalDetokenizer


class QueueFull(Exception):
    """The queue holds `max_queue` rows already."""


class ShuttingDown(Exception):
    """The model is being unloaded or the server is stopping."""


def length_buckets(largest, smallest=16, factor=4):
    """`[..., largest // factor, largest]`, none under `smallest` (always `largest` itself)."""
    buckets = [largest]
    while buckets[-1] // factor >= smallest:
        buckets.append(buckets[-1] // factor)
    return sorted(buckets)


def bucket(value, buckets):
    """The smallest bucket that holds `value`."""
    for size in buckets:
        if value <= size:
            return size
    raise ValueError(f"{value} is over the largest bucket {buckets[-1]}")


@dataclass
class SamplingSettings:
    """One row's sampling: `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 keep every token."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self):
        return self.temperature == 0 or self.top_k == 1


def sample_token(logits, settings, rng):
    """The next token from float logits `(V,)` with temperature, then top-k, then top-p."""
    logits = np.asarray(logits, np.float64) / settings.temperature
    if settings.top_k and settings.top_k < len(logits):
        candidates = np.argpartition(-logits, settings.top_k - 1)[: settings.top_k]
    else:
        candidates = np.arange(len(logits))
    if settings.top_p < 1.0:
        candidates = candidates[np.argsort(-logits[candidates], kind="stable")]
    chosen = logits[candidates]
    weights = np.exp(chosen - chosen.max())
    weights /= weights.sum()
    if settings.top_p < 1.0:
        before = np.cumsum(weights) - weights
        keep = before < settings.top_p
        candidates, weights = candidates[keep], weights[keep] / weights[keep].sum()
    return int(candidates[rng.choice(len(candidates), p=weights)])


@dataclass
class Row:
    """One sequence to generate, and where its events go.

    `emit` is called from the worker thread with `("delta", text)`,
    `("done", finish_reason, completion_tokens)` or `("error", status,
    message)`; it must be thread-safe (the server posts to its event loop).
    """

    prompt: object  # engines.Prompt
    max_tokens: int
    sampling: SamplingSettings
    stop: tuple
    emit: object
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)


class _RowState:
    """A row while its batch runs: its text so far, what was sent, its tokens."""

    def __init__(self, row, engine):
        self.row = row
        self.rng = np.random.default_rng(row.sampling.seed)
        self.detokenizer = IncrementalDetokenizer(engine.decode, engine.special_ids)
        self.text = ""
        self.sent = 0
        self.tokens = 0
        self.active = True

    def add_text(self, piece):
        """Adds a piece; sends what can no longer be the start of a stop string. True if a stop string ended it."""
        self.text += piece
        for stop in self.row.stop:
            found = self.text.find(stop, max(0, self.sent - len(stop)))
            if found >= 0:
                self.text = self.text[:found]
                self._send(len(self.text))
                return True
        held = max((_overlap(self.text, stop) for stop in self.row.stop), default=0)
        self._send(len(self.text) - held)
        return False

    def _send(self, end):
        if end > self.sent:
            self.row.emit(("delta", self.text[self.sent : end]))
            self.sent = end

    def finish(self, reason):
        self.active = False
        self._send(len(self.text))
        self.row.emit(("done", reason, self.tokens))

    def fail(self, status, message):
        self.active = False
        self.row.emit(("error", status, message))


def _overlap(text, stop):
    """The length of the longest end of `text` that is a proper start of `stop`."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


class Batcher:
    """The queue and decode loop of one loaded model (see the module docstring).

    Args:
        engine: a `KerasEngine` or `OnnxEngine`.
        batch_sizes: sorted batch-size buckets; the largest is the most rows per batch.
        encoder_lengths: encoder-length buckets; the largest is the prompt token limit.
        decode_lengths: decoder cache-length buckets (`max_tokens + 1`).
        max_images: image-slot bucket for prompts with images (text-only batches use 0 slots).
        max_queue: rows that may wait; more raise `QueueFull`.
        batch_wait: seconds the worker waits for more rows after the first.
        companion_wait: right after a batch, the longest wait for its rows'
            clients to come back, as a fraction of its decode time (0: none).
        metrics: a `ServerMetrics` or None.
        name: the model's name (metric labels).
    """

    def __init__(
        self,
        engine,
        batch_sizes,
        encoder_lengths,
        decode_lengths,
        max_images,
        max_queue,
        batch_wait=0.0,
        companion_wait=0.1,
        metrics=None,
        name="model",
    ):
        self.engine = engine
        self.batch_sizes = sorted(batch_sizes)
        self.encoder_lengths = sorted(encoder_lengths)
        self.decode_lengths = sorted(decode_lengths)
        self.max_images = max_images
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.companion_wait = companion_wait
        self.metrics = metrics
        self.name = name
        self._queue = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self.active_rows = 0
        # The last batch: when it ended, its decode seconds, and its rows plus those queued then.
        self._last_end, self._last_seconds, self._expected_rows = 0.0, 0.0, 0
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # === Queue ===

    def submit(self, rows):
        """Queues `rows` together, or raises `QueueFull` / `ShuttingDown` without queueing any."""
        with self._condition:
            if self._closed:
                raise ShuttingDown(f"the model {self.name} is unloading")
            if len(self._queue) + len(rows) > self.max_queue:
                raise QueueFull(f"the queue of {self.name} is full ({self.max_queue} rows)")
            self._queue.extend(rows)
            self._set_queue_depth()
            self._condition.notify()

    @property
    def busy(self):
        with self._condition:
            return bool(self._queue) or self.active_rows > 0

    def close(self):
        """Stops taking rows; queued rows are answered 503; the running batch finishes."""
        with self._condition:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._set_queue_depth()
            self._condition.notify_all()
        for row in pending:
            row.emit(("error", 503, f"the model {self.name} is unloading"))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _set_queue_depth(self):
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))

    def _take_batch(self):
        """Up to the largest batch size of rows, after `batch_wait` and the wait for companions."""
        largest = self.batch_sizes[-1]
        with self._condition:
            while not self._queue and not self._closed:
                self._condition.wait()
            if self._closed:
                return []
            deadline = time.monotonic() + self.batch_wait
            companions = min(largest, self._expected_rows)
            companions_deadline = self._last_end + self.companion_wait * self._last_seconds
            while len(self._queue) < largest and not self._closed:
                now = time.monotonic()
                if now >= deadline and (len(self._queue) >= companions or now >= companions_deadline):
                    break
                left = max(deadline, companions_deadline if len(self._queue) < companions else deadline) - now
                self._condition.wait(left)
            rows = [self._queue.popleft() for _ in range(min(largest, len(self._queue)))]
            self.active_rows = len(rows)
            self._set_queue_depth()
            return rows

    def _run(self):
        while True:
            rows = self._take_batch()
            if not rows:
                return
            started = time.monotonic()
            try:
                self._decode(rows)
            except Exception as error:  # a bug or a backend failure: answer the rows, keep serving
                for row in rows:
                    row.emit(("error", 500, f"generation failed: {type(error).__name__}: {error}"))
            finally:
                with self._condition:
                    self.active_rows = 0
                    self._last_end = time.monotonic()
                    self._last_seconds = self._last_end - started
                    self._expected_rows = len(rows) + len(self._queue) if len(rows) > 1 else 0

    # === Decoding ===

    def shapes(self, rows):
        """`(batch, encoder length, image slots, cache length)` buckets for `rows`."""
        batch = bucket(len(rows), self.batch_sizes)
        length = bucket(max(len(row.prompt.token_ids) for row in rows), self.encoder_lengths)
        images = self.max_images if any(row.prompt.num_images for row in rows) else 0
        cache = bucket(max(row.max_tokens for row in rows) + 1, self.decode_lengths)
        return batch, length, images, cache

    def _inputs(self, rows, batch, length, images):
        """Right-padded `(token_ids, padding_mask, pixels)`; padding rows repeat the first row."""
        token_ids = np.zeros((batch, length), "int32")
        padding_mask = np.zeros((batch, length), "int32")
        pixels = None
        if self.engine.vision:
            pixels = np.zeros((batch, images, *self.engine.image_shape), "float32")
        for index in range(batch):
            prompt = rows[index if index < len(rows) else 0].prompt
            token_ids[index, : len(prompt.token_ids)] = prompt.token_ids
            padding_mask[index, : len(prompt.token_ids)] = 1
            if prompt.num_images:
                pixels[index, : prompt.num_images] = prompt.pixels
        return token_ids, padding_mask, pixels

    def _decode(self, rows):
        now = time.monotonic()
        live = []
        for row in rows:
            if row.cancelled.is_set():
                row.emit(("error", 499, "the client left"))
            elif now > row.deadline:
                row.emit(("error", 503, "the request timed out in the queue"))
            else:
                live.append(row)
        if not live:
            return
        batch, length, images, cache_length = self.shapes(live)
        if self.metrics is not None:
            self.metrics.batch_size.labels(self.name).observe(len(live))
        states = [_RowState(row, self.engine) for row in live]
        token_ids, padding_mask, pixels = self._inputs(live, batch, length, images)
        cache = self.engine.start(token_ids, padding_mask, pixels, cache_length)
        tokens = np.full((batch, 1), self.engine.bos_id, "int32")
        started = time.monotonic()
        for position in range(cache_length - 1):
            logits, argmax, cache = self.engine.step(tokens, cache, position)
            argmax = np.asarray(argmax)
            host_logits = None
            now = time.monotonic()
            for index, state in enumerate(states):
                if not state.active:
                    continue
                row = state.row
                if row.cancelled.is_set():
                    state.fail(499, "the client left")
                    continue
                if now > row.deadline:
                    state.fail(503, "the request timed out")
                    continue
                if row.sampling.greedy:
                    token = int(argmax[index])
                else:
                    if host_logits is None:
                        host_logits = np.asarray(logits)
                    token = sample_token(host_logits[index], row.sampling, state.rng)
                tokens[index, 0] = token
                state.tokens += 1
                if state.tokens == 1 and self.metrics is not None:
                    self.metrics.time_to_first_token.labels(self.name).observe(now - row.enqueued)
                if token == self.engine.eos_id:
                    state.add_text(state.detokenizer.flush())
                    state.finish("stop")
                    continue
                if state.add_text(state.detokenizer.push(token)):
                    state.finish("stop")
                    continue
                if state.tokens >= row.max_tokens:
                    if state.add_text(state.detokenizer.flush()):
                        state.finish("stop")
                    else:
                        state.finish("length")
            if not any(state.active for state in states):
                break
        for state in states:
            if state.active:
                state.finish("length")
        if self.metrics is not None:
            generated = sum(state.tokens for state in states)
            self.metrics.generated_tokens.labels(self.name).inc(generated)
            self.metrics.decode_seconds.labels(self.name).observe(time.monotonic() - started)

    # === Warm-up ===

    def warm_up(self):
        """Runs every bucketed shape once (start and one step), so no request compiles. Returns the count."""
        shapes = 0
        image_slots = [0, self.max_images] if self.engine.vision and self.max_images else [0]
        for batch in self.batch_sizes:
            for length in self.encoder_lengths:
                for cache_length in self.decode_lengths:
                    for images in image_slots:
                        token_ids = np.full((batch, length), self.engine.bos_id, "int32")
                        padding_mask = np.ones((batch, length), "int32")
                        pixels = None
                        if self.engine.vision:
                            pixels = np.zeros((batch, images, *self.engine.image_shape), "float32")
                        cache = self.engine.start(token_ids, padding_mask, pixels, cache_length)
                        if images == 0:
                            tokens = np.full((batch, 1), self.engine.bos_id, "int32")
                            np.asarray(self.engine.step(tokens, cache, 0)[1])
                        shapes += 1
        return shapes


def retry_after_seconds(queue_rows, rows_per_second):
    """A `Retry-After` estimate: the queue's drain time at the recent rate, 1 to 30 s."""
    if not rows_per_second:
        return 1
    return int(min(30, max(1, math.ceil(queue_rows / rows_per_second))))
