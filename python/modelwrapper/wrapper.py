"""``ModelWrapper``: the seed library's API, backed by a volume path.

A wrapper is a small picklable handle on a directory; sending it to a Ray
actor or task sends a path, never weights. ``load()`` maps the weights
zero-copy from shared memory.

A wrapper of a generation that ``from_model()`` published keeps it alive: the
generation is freed once no wrapper object refers to it and no process maps
it (``_gc``), or at once with :meth:`ModelWrapper.release`.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _cluster, _gc
from ._cluster import ClusterRef
from ._export import component_name, detect_components, model_info
from ._format import read_manifest
from ._load import load as _load_volume
from ._local import publish_local
from ._root import local_generation

if TYPE_CHECKING:
    import torch

log = logging.getLogger("modelwrapper")

_MODES = ("actor", "task")


def _component_info(c: dict[str, Any]) -> dict[str, Any]:
    """Size, tensor count and dtypes of one manifest component (one file, or
    the shards of a directory)."""
    if c.get("weights"):
        w = c["weights"]
        return {"component": c["name"], "bytes": w["bytes"], "tensors": w["tensors"], "dtypes": w["dtypes"]}
    directory = c.get("directory") or {}
    shards = [e for e in directory.get("files", []) if e["file"] in set(directory.get("weights", []))]
    return {
        "component": c["name"],
        "bytes": sum(e["bytes"] for e in directory.get("files", [])),
        "tensors": sum(e["safetensors"]["tensors"] for e in shards),
        "dtypes": sorted({d for e in shards for d in e["safetensors"]["dtypes"]}),
        "revision": directory.get("revision"),
    }


class ModelWrapper:
    """Handle on a model volume, created with :meth:`from_model` or :meth:`from_volume`."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        mode: str,
        is_standalone: bool,
        model_info: dict[str, dict[str, Any]],
        method_names: tuple[str, ...] | list[str] | None = None,
        cluster: ClusterRef | None = None,
        _lease: _gc.LeaseKey | None = None,
    ):
        if mode not in _MODES:
            raise ValueError(f"mode must be 'actor' or 'task', not {mode!r}")
        if (path is None) == (cluster is None):
            raise ValueError("a ModelWrapper is either a volume path or a cluster reference")
        self._cluster = cluster
        self._path = Path(path) if path is not None else None
        self._mode = mode
        self._is_standalone_module = is_standalone
        self._model_info = model_info
        self._method_names = _check_method_names(method_names)
        self._released = False
        # This object holds its generation (local ones only) until it is
        # garbage-collected or released; `_lease` is one already taken for it.
        # In a cluster the ModelWrapper object (owned by its pod) holds it.
        lease = _lease if _lease is not None or self._path is None else _gc.acquire(self._path)
        self._finalizer = weakref.finalize(self, _gc.release, lease) if lease is not None else None

    # construction -------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: Any,
        mode: str = "actor",
        *,
        name: str | None = None,
        method_names: tuple[str, ...] | list[str] | None = None,
        owner: Any = None,
        timeout: float = _cluster.DEFAULT_TIMEOUT,
    ) -> "ModelWrapper":
        """Exports ``model`` (an ``nn.Module`` or a pipeline object) once into the
        local shared-memory root (``$MODELWRAPPER_ROOT``, default
        ``/dev/shm/zerocopy``) and returns a wrapper for it.

        The generation stays in shared memory (RAM) while this wrapper or a
        copy of it in any process is alive, or a process maps it; after that
        the next ``from_model()`` anywhere, or ``python -m modelwrapper gc``,
        frees it. ``release()`` lets go of it at once.

        ``method_names`` (task mode, as in the seed): the methods a task
        pipeline exposes as Ray tasks besides calling it, e.g.
        ``("forward", "predict")``; by default every public method.

        In a pod with ``MODELWRAPPER_CATALOG`` set (the namespace catalog
        volume; docs/ray.md) the model goes to the cluster instead: a
        ModelWrapper in the pod's namespace (owned by this pod unless
        ``owner=`` names another object, or ``owner=False``), uploaded to
        this node's agent, spread to every node whose pods mount the catalog;
        it returns once a node holds a verified copy (``timeout`` seconds at
        most), and the wrapper pickles to (namespace, name, generation)."""
        if mode not in _MODES:
            raise ValueError(f"mode must be 'actor' or 'task', not {mode!r}")
        _check_method_names(method_names)
        if _cluster.catalog() is not None:
            ref, standalone, info = _cluster.publish(model, mode=mode, name=name, owner=owner, timeout=timeout)
            return cls(None, mode=mode, is_standalone=standalone, model_info=info, method_names=method_names, cluster=ref)
        standalone, modules = detect_components(model)
        wrapper_name = name or component_name(type(model).__name__)
        path, lease = publish_local(model, name=wrapper_name, mode=mode)
        info = model_info(modules)
        try:
            wrapper = cls(
                path,
                mode=mode,
                is_standalone=standalone,
                model_info=info,
                method_names=method_names,
                _lease=lease,
            )
        except BaseException:
            _gc.release(lease)
            raise
        _collect_quietly()
        return wrapper

    @classmethod
    def from_volume(cls, path: str | os.PathLike[str] | None = None) -> "ModelWrapper":
        """A wrapper for a mounted or filled volume; ``path`` defaults to
        ``$MODELWRAPPER_PATH`` (set by the operator in task pods)."""
        path = path or os.environ.get("MODELWRAPPER_PATH")
        if not path:
            raise ValueError("from_volume() needs a path, or MODELWRAPPER_PATH set to the mounted volume")
        manifest = read_manifest(Path(path))
        comps = manifest["components"]
        standalone = len(comps) == 1 and not manifest.get("pipelineSkeleton")
        info = {c["name"].replace("-", "_"): _component_info(c) for c in comps}
        return cls(path, mode=manifest.get("mode", "actor"), is_standalone=standalone, model_info=info)

    @classmethod
    def for_tasks(cls, pipeline: Any) -> "TaskPipeline":
        """Task mode in one step: each call of the result runs as a Ray task
        (or in-process when Ray is not running)."""
        return cls.from_model(pipeline, mode="task").load()

    # use ------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The generation's directory in this process: for a cluster
        wrapper, under this pod's catalog once Ready on this node (waits)."""
        self._check_usable()
        if self._cluster is not None:
            return _cluster.resolve(self._cluster)
        assert self._path is not None
        return self._path

    def _check_usable(self) -> None:
        if self._released:
            raise RuntimeError(
                f"this ModelWrapper was released (wrapper.release()); {self._path} may have been freed. "
                "Create a new one with ModelWrapper.from_model(), or do not release a wrapper you still use"
            )

    def load(
        self,
        _use_fast_load: bool = False,
        *,
        copy_on_write: bool | None = None,
        timeout: float = _cluster.DEFAULT_TIMEOUT,
        device: str | torch.device | None = None,
        prefault: bool | str | None = None,
    ) -> Any:
        """Actor mode: the model or pipeline, mapped zero-copy (on CPU, eval,
        no grad, read-only: see ``modelwrapper.load``). ``_use_fast_load=True``
        prefaults the page tables up front. Task mode: a :class:`TaskPipeline`
        whose calls run as Ray tasks.

        A cluster wrapper is loaded from this pod's catalog: ``load()`` waits
        until it is Ready on this node (``timeout`` seconds, logging its
        status every few seconds) and fails at once with the reason when
        this node cannot get it.

        ``device="cuda:N"`` copies the weights from the node copy to that GPU
        at close to the host-to-device limit; ``prefault="background"``
        returns at once and fills the page tables in a thread (see
        ``modelwrapper.load``)."""
        self._check_usable()
        if self._mode == "task":
            return TaskPipeline(self)
        path = _cluster.resolve(self._cluster, timeout) if self._cluster is not None else self._path
        return _load_volume(
            path,
            prefault=prefault if prefault is not None else _use_fast_load,
            copy_on_write=copy_on_write,
            device=device,
        )

    def release(self) -> bool:
        """Drops this wrapper's hold on its generation now, instead of when it
        is garbage-collected, and frees the generation unless something else
        still uses it: another wrapper object (in any process) or a process
        that maps it, this one included while tensors from ``load()`` live.
        The wrapper is unusable afterwards. Returns True when the generation
        was freed. Generations the node agent filled are never freed here."""
        if self._released:
            return False
        self._released = True
        if self._finalizer is not None:
            self._finalizer()
        if self._path is None:
            return False  # the ModelWrapper object in the cluster holds it
        found = local_generation(self._path)
        if found is None:
            return False
        root, name, generation = found
        report = _gc.collect(root, only=(name, generation), timeout=30.0)
        return any(d.path.name == generation for d in report.freed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a ModelWrapper is not callable: call wrapper.load() (actor mode) or use ModelWrapper.for_tasks()")

    def serialize(self) -> dict[str, Any]:
        """A small JSON-able description (path and metadata, no weights)."""
        self._check_usable()
        return {
            "path": str(self._path) if self._path is not None else None,
            "cluster": vars(self._cluster).copy() if self._cluster is not None else None,
            "mode": self._mode,
            "is_standalone": self._is_standalone_module,
            "model_info": self._model_info,
            "method_names": list(self._method_names) if self._method_names is not None else None,
        }

    @classmethod
    def deserialize(cls, data: dict[str, Any] | None = None, **fields: Any) -> "ModelWrapper":
        """The inverse of :meth:`serialize`: ``deserialize(d)`` or, as in the
        seed, ``deserialize(**d)``."""
        if data is not None and fields:
            raise TypeError("deserialize() takes the serialized dict or its keys as keyword arguments, not both")
        data = dict(data if data is not None else fields)
        missing = sorted({"mode", "is_standalone", "model_info"} - data.keys())
        if data.get("path") is None and not data.get("cluster"):
            missing.append("path")
        if missing:
            raise TypeError(f"deserialize() is missing {', '.join(missing)}: pass what wrapper.serialize() returned")
        names = data.get("method_names")
        cluster = data.get("cluster")
        return cls(
            data.get("path"),
            cluster=ClusterRef(**cluster) if cluster else None,
            mode=data["mode"],
            is_standalone=data["is_standalone"],
            model_info=data["model_info"],
            method_names=tuple(names) if names is not None else None,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (ModelWrapper.deserialize, (self.serialize(),))

    def __repr__(self) -> str:
        released = ", released" if self._released else ""
        where = (
            f"cluster={self._cluster.namespace}/{self._cluster.name}@{self._cluster.generation}"
            if self._cluster is not None
            else f"path={str(self._path)!r}"
        )
        return f"ModelWrapper({where}, mode={self._mode!r}, components={list(self._model_info)}{released})"


def _check_method_names(names: tuple[str, ...] | list[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"method_names must be a tuple of method names such as ('forward', 'predict'), not {names!r}")
    return tuple(names)


def _collect_quietly() -> None:
    """The collection every from_model() runs: frees what wrappers of ended
    processes left; never waits for, or fails, the caller."""
    try:
        report = _gc.collect(timeout=0)
    except OSError as e:
        log.warning("freeing unused generations failed: %s (run `python -m modelwrapper gc` to see why)", e)
        return
    for d in report.freed:
        log.info("freed %s (%.1f MiB): %s", d.path, d.bytes / 2**20, d.reason)


@functools.lru_cache(maxsize=8)
def _cached_load(where: str | ClusterRef) -> Any:
    """One zero-copy load per worker process and volume; a cluster wrapper
    is waited for on the node the task landed on."""
    path = _cluster.resolve(where) if isinstance(where, ClusterRef) else where
    return _load_volume(path)


def _invoke(where: str | ClusterRef, attribute: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    target = _cached_load(where)
    for part in attribute.split(".") if attribute else ():
        target = getattr(target, part)
    return target(*args, **kwargs)


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


class TaskPipeline:
    """Calls run as Ray tasks that map the volume on their node; without Ray
    they run in this process. Component calls (``p.encoder(x)``) work too."""

    def __init__(self, wrapper: ModelWrapper, attribute: str | None = None):
        self._wrapper = wrapper
        self._attribute = attribute

    def __getattr__(self, name: str) -> "TaskPipeline":
        if name.startswith("_"):
            raise AttributeError(name)
        allowed = self._wrapper._method_names
        is_component = self._attribute is None and not self._wrapper._is_standalone_module and name in self._wrapper._model_info
        if allowed is not None and not is_component and name not in allowed:
            raise AttributeError(
                f"{name!r} is not exposed by this task pipeline: method_names={allowed}; "
                "pass it in method_names to ModelWrapper.from_model()"
            )
        path = name if self._attribute is None else f"{self._attribute}.{name}"
        return TaskPipeline(self._wrapper, path)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        w = self._wrapper
        w._check_usable()
        where: str | ClusterRef = w._cluster if w._cluster is not None else str(w.path)
        if _ray_running():
            import ray

            remote = ray.remote(_invoke)
            return ray.get(remote.remote(where, self._attribute, args, kwargs))
        return _invoke(where, self._attribute, args, kwargs)
