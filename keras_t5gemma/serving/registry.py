"""Models by name: loaded on first use, unloaded after `keep_alive` idle seconds, at most `max_loaded` at once.

Loading runs in a daemon thread (it takes seconds to minutes, compiling every
bucketed shape); requests for a model that is loading wait for it, and a server
told to stop while loading exits without waiting for the load. When a load
would pass `max_loaded`, the least recently used idle model is unloaded first.
"""

import asyncio
import gc
import logging
import threading
import time
from dataclasses import dataclass

from keras_t5gemma.serving.batching import Batcher
from keras_t5gemma.serving.batching import length_buckets
from keras_t5gemma.serving.engines import KerasEngine
from keras_t5gemma.serving.engines import OnnxEngine

log = logging.getLogger("keras_t5gemma.serving")


@dataclass
class ModelSpec:
    """A servable model: `kind` "keras" (a preset) or "onnx" (an export folder)."""

    name: str
    kind: str
    source: str


class UnknownModel(KeyError):
    pass


async def in_daemon_thread(function, *args):
    """`await`s `function(*args)` run in a daemon thread.

    `asyncio.to_thread` runs in the loop's executor, whose threads the
    interpreter joins at exit: a server stopped during a minutes-long load
    would wait for it. A daemon thread is dropped at exit instead.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(method, value):
        if not future.done():
            method(value)

    def run():
        try:
            outcome = (future.set_result, function(*args))
        except BaseException as error:  # handed to the awaiting request, whatever it is
            outcome = (future.set_exception, error)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop closed while this ran: the server is stopping
        _LOADS.discard(threading.current_thread())

    thread = threading.Thread(target=run, name=f"load-{getattr(function, '__name__', 'model')}", daemon=True)
    _LOADS.add(thread)
    thread.start()
    return await future


_LOADS = set()


def load_in_progress():
    """Whether a daemon thread started by `in_daemon_thread` is still running.

    Such a thread may be inside XLA's compiler; letting the interpreter
    finalise around it crashes the process (SIGABRT or SIGSEGV) or hangs
    it, so the server leaves with `os._exit` instead.
    """
    return any(thread.is_alive() for thread in list(_LOADS))


class LoadedModel:
    """An engine and its batcher, with the limits of its buckets."""

    def __init__(self, spec, engine, batcher, max_prompt_tokens, max_tokens):
        self.spec = spec
        self.engine = engine
        self.batcher = batcher
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens = max_tokens
        self.last_used = time.monotonic()
        self.users = 0


class ModelRegistry:
    """See the module docstring; `settings` is the server's `ServerSettings`."""

    def __init__(self, specs, settings, metrics):
        self.specs = {spec.name: spec for spec in specs}
        self.default = specs[0].name
        self.settings = settings
        self.metrics = metrics
        self.loaded = {}
        self._locks = {name: asyncio.Lock() for name in self.specs}
        self._thread_lock = threading.Lock()

    def resolve(self, name):
        name = name or self.default
        if name not in self.specs:
            raise UnknownModel(name)
        return name

    async def get(self, name):
        """The loaded model `name` (loading it, and evicting, if needed); counts a user until `release`."""
        name = self.resolve(name)
        async with self._locks[name]:
            model = self.loaded.get(name)
            if model is None:
                await self._evict_for_one_more()
                model = await in_daemon_thread(self._load, self.specs[name])
                self.loaded[name] = model
                self.metrics.loaded_models.set(len(self.loaded))
            model.users += 1
            model.last_used = time.monotonic()
            return model

    def release(self, model):
        model.users -= 1
        model.last_used = time.monotonic()

    def _load(self, spec):
        settings = self.settings
        started = time.monotonic()
        if spec.kind == "onnx":
            engine = OnnxEngine(spec.source, threads=settings.onnx_threads, precision=settings.onnx_precision)
        else:
            engine = KerasEngine(spec.source, embed_batch_sizes=settings.batch_sizes)
        max_prompt_tokens = settings.max_prompt_tokens
        if engine.max_prompt_length is not None:
            max_prompt_tokens = min(max_prompt_tokens, engine.max_prompt_length)
        max_tokens = settings.max_tokens
        if engine.max_decode_length is not None:
            max_tokens = min(max_tokens, engine.max_decode_length - 1)
        batcher = Batcher(
            engine,
            batch_sizes=settings.batch_sizes,
            encoder_lengths=length_buckets(max_prompt_tokens),
            decode_lengths=length_buckets(max_tokens + 1),
            max_images=settings.max_images if engine.vision else 0,
            max_queue=settings.max_queue,
            batch_wait=settings.batch_wait_ms / 1000,
            metrics=self.metrics,
            name=spec.name,
        )
        shapes = 0
        if settings.warmup and engine.kind == "keras":
            shapes = batcher.warm_up()
            engine.warm_up_embeddings()
        log.info(
            '{"event": "model_loaded", "model": "%s", "kind": "%s", "seconds": %.2f, "warmed_shapes": %d}',
            spec.name,
            spec.kind,
            time.monotonic() - started,
            shapes,
        )
        return LoadedModel(spec, engine, batcher, max_prompt_tokens, max_tokens)

    async def _evict_for_one_more(self):
        while len(self.loaded) >= self.settings.max_loaded_models:
            idle = [model for model in self.loaded.values() if model.users == 0 and not model.batcher.busy]
            if not idle:
                return  # every loaded model is serving: go over the cap rather than fail a request
            await self.unload(min(idle, key=lambda model: model.last_used).spec.name, "lru")

    async def unload(self, name, reason):
        model = self.loaded.pop(name, None)
        if model is None:
            return
        await asyncio.to_thread(model.batcher.close)
        del model
        gc.collect()
        self.metrics.loaded_models.set(len(self.loaded))
        log.info('{"event": "model_unloaded", "model": "%s", "reason": "%s"}', name, reason)

    async def unload_idle(self):
        """Unloads models idle for longer than `keep_alive` seconds (never while a request uses them)."""
        keep_alive = self.settings.keep_alive
        if keep_alive is None:
            return
        now = time.monotonic()
        for name, model in list(self.loaded.items()):
            if model.users == 0 and not model.batcher.busy and now - model.last_used > keep_alive:
                async with self._locks[name]:
                    if model.users == 0 and self.loaded.get(name) is model:
                        await self.unload(name, "keep_alive")

    async def close(self):
        for name in list(self.loaded):
            await self.unload(name, "shutdown")
