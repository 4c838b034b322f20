"""The plugin manager: loads the ``keybroker`` entry-point group, typed hook calls.

Built-in plugins are registered exactly like third-party ones, through the
entry-point group, so every plugin sees the same surface. Names listed in
``disabled_plugins`` are blocked before loading.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

import pluggy

from . import hookspecs
from .cluster import Cluster, Solo
from .errors import InvalidArgument, StartupError
from .logs import failure
from .policy import AuthzRequest, Policy, combine

if TYPE_CHECKING:
    from .audit import AuditSink
    from .backend import Backend, RootKey
    from .config import Config
    from .events import KeyEvent
    from .keys import Key
    from .policy import RpcMethod
    from .store import Store

__all__ = ["Plugins", "StartupError"]

log = logging.getLogger("keybroker.plugins")
_T = TypeVar("_T")

# Authorization decisions remembered at most; the cache starts over when full.
DECISION_CACHE_SIZE = 65_536


class Plugins:
    """Typed access to the hooks of every loaded plugin."""

    def __init__(self, config: Config, *, extra: Sequence[object] = (), entry_points: bool = True) -> None:
        """Load plugins.

        Args:
            config: the broker configuration, handed to provider hooks.
            extra: plugin objects registered after the entry points (tests,
                embedding applications).
            entry_points: load the ``keybroker`` entry-point group.

        Raises:
            pluggy.PluginValidationError: a plugin implements an unknown hook
                or a hook with parameters the spec does not have.
        """
        self.config = config
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        for name in config.disabled_plugins:
            self.manager.set_blocked(name)
        if entry_points:
            installed = {ep.name for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)}
            unknown = sorted(set(config.disabled_plugins) - installed)
            if unknown:
                # A misspelled name would leave the plugin it meant enabled.
                raise StartupError(f"disabled_plugins names no installed plugin: {', '.join(unknown)}")
            self.manager.load_setuptools_entrypoints(hookspecs.PROJECT)
        for plugin in extra:
            self.manager.register(plugin)
        self.manager.check_pending()
        self._hook = self.manager.hook
        self._decisions: dict[tuple[str, str, str | None, str | None], bool] = {}
        self.policies: list[Policy] = self._provided("kb_policies", Policy, config=config)

    def _provided(self, hook: str, kind: type[_T], **kwargs: object) -> list[_T]:
        """What every plugin's ``hook`` returns, flattened: each must return a
        list (or tuple) of ``kind``. A plugin that returns anything else is
        named in the StartupError."""
        caller = getattr(self._hook, hook)
        impls = caller.get_hookimpls()
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            # Wrappers change what the others return: let pluggy call them all.
            return [item for batch in caller(**kwargs) for item in batch]
        found: list[_T] = []
        for impl in reversed(impls):  # pluggy's call order
            batch = impl.function(**{name: kwargs[name] for name in impl.argnames})
            if batch is None:
                continue
            if not isinstance(batch, list | tuple) or not all(isinstance(item, kind) for item in batch):
                # A module plugin by its module, an object by its class.
                named = getattr(impl.plugin, "__name__", type(impl.plugin).__qualname__)
                raise StartupError(
                    f"plugin {impl.plugin_name!r} ({named}): {hook} must return a list of {kind.__name__}, "
                    f"not {type(batch).__name__}"
                )
            found.extend(batch)
        return found

    @property
    def names(self) -> list[str]:
        """Names of the registered plugins."""
        return sorted(name for name, plugin in self.manager.list_name_plugin() if name and plugin is not None)

    def root_key(self) -> RootKey:
        root = self._hook.kb_root_key(config=self.config)
        if root is None:
            raise StartupError(f"no plugin provides the root of trust {self.config.root!r}")
        return cast("RootKey", root)

    def store(self) -> Store:
        store = self._hook.kb_store(config=self.config)
        if store is None:
            raise StartupError(f"no plugin provides the store {self.config.store!r}")
        return cast("Store", store)

    def cluster(self, store: Store) -> Cluster:
        """The shared store's coordination, or :class:`Solo` for a broker on its own."""
        found = self._hook.kb_cluster(config=self.config, store=store)
        return Solo() if found is None else cast("Cluster", found)

    def backends(self, root: RootKey) -> dict[str, Backend]:
        found: dict[str, Backend] = {}
        # Backend is a Protocol: the list is checked, its items are trusted.
        provided = self._provided("kb_backends", object, config=self.config, root=root)
        for backend in cast("list[Backend]", provided):
            if backend.protection in found:
                raise StartupError(f"two backends claim protection {backend.protection!r}")
            found[backend.protection] = backend
        return found

    def audit_sinks(self) -> list[AuditSink]:
        sinks = cast("list[AuditSink]", self._provided("kb_audit_sinks", object, config=self.config))
        primaries = [sink for sink in sinks if sink.primary]
        if len(primaries) != 1:
            raise StartupError(f"exactly one primary audit sink is needed, found {len(primaries)}")
        return sinks

    def authorize(self, request: AuthzRequest) -> bool:
        """Deny by default: allowed iff some policy allows and none denies.

        Policies are pure functions of the request (configuration is read at
        start), so decisions are remembered in a bounded cache: most traffic
        is the same few principals using the same few keys.
        """
        return self.decide(request.principal, request.operation, request.key, request.classification)

    def decide(self, principal: str, operation: str, key: str | None, classification: str | None) -> bool:
        """:meth:`authorize` of the request with these fields, built only when not cached."""
        fields = (principal, operation, key, classification)
        cached = self._decisions.get(fields)
        if cached is None:
            request = AuthzRequest(principal, operation, key, classification)
            cached = combine(policy.authorize(request) for policy in self.policies)
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[fields] = cached
        return cached

    def roles(self, principal: str) -> list[str]:
        return sorted({role for policy in self.policies for role in policy.roles(principal)})

    def validate(self, key: Key, action: str) -> None:
        """Raise InvalidArgument naming every governance rule ``key`` breaks."""
        rules = [rule for policy in self.policies for rule in policy.validate(key, action)]
        if rules:
            raise InvalidArgument("; ".join(rules), {"rules": rules})

    def required_approvals(self, key: Key, action: str) -> int:
        """The most approvals any policy asks for (0 when none does)."""
        counts = [policy.required_approvals(key, action) for policy in self.policies]
        return max((c for c in counts if c is not None), default=0)

    def key_event(self, event: KeyEvent) -> None:
        """Tell every observer; one that raises is logged and the others still hear of it.

        The change is durable by now: an observer's failure must not turn it
        into an error for the caller, nor stop the scheduler.
        """
        for impl in self._hook.kb_key_event.get_hookimpls():
            try:
                impl.function(event=event)
            except Exception as exc:
                log.error("key event observer %s failed: %s", impl.plugin_name, failure(exc))

    def rpc_methods(self) -> dict[str, RpcMethod]:
        methods: dict[str, RpcMethod] = {}
        for batch in cast("list[Mapping[str, RpcMethod]]", self._hook.kb_rpc_methods(config=self.config)):
            for name, method in batch.items():
                if name in methods:
                    raise StartupError(f"two plugins define the RPC method {name!r}")
                methods[name] = method
        return methods
