"""Electrodes: the one hook mechanism of neuroprobe.

An electrode is implanted at a :class:`~neuroprobe.subjects.base.Site` and either
**reads** it (recording) or **edits** it (lesion, steering), or both (a lesioned
run can be recorded).  Nothing else in the code base registers hooks.

Every site is seen in one canonical shape, ``[batch, tokens, units]``, whatever its
native layout (time-major XLNet tensors, convolution maps, pooled vectors), so a
reader or an edit never has to know the architecture::

    with Electrodes(subject.model, sites) as el:
        subject.forward(batch)
    el.data["encoder.layer.3.mlp"]          # [B, T, U]

    def silence(x, site):                   # x: [B, T, U]
        x = x.clone(); x[..., [7, 12]] = 0; return x
    with Electrodes(subject.model, sites, read=False, edits={"encoder.layer.3.mlp": silence}):
        subject.forward(batch)              # lesioned run; hooks are gone afterwards

A *feature site* (``site.sae`` set, :mod:`neuroprobe.sae.sites`) reads the SAE's
features of its module's activation, and an edit of those features moves the
activation by the changed features' decoder contribution (error term kept).

A module that fires more than once per forward pass is addressed by the site's
``call`` index; if a site without a call index fires twice during one forward pass
the electrode raises instead of silently overwriting the first value.

Every hook first calls :func:`neuroprobe.interrupts.check`: after a Ctrl-C, a
forward pass stops at the next module on the way to a site.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from neuroprobe import interrupts
from neuroprobe.errors import NeuroprobeError
from neuroprobe.sae.sites import check_width, edit_source
from neuroprobe.subjects.base import Site

Edit = Callable[[torch.Tensor, Site], torch.Tensor]
OnRead = Callable[[Site, torch.Tensor], None]


def to_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a site's native tensor as ``[batch, tokens, units]``."""
    if layout == "BTU":
        return x
    if layout == "TBU":
        return x.transpose(0, 1)
    if layout == "BU":
        return x.unsqueeze(1)
    if layout == "BCHW":
        b, c = x.shape[:2]
        return x.reshape(b, c, -1).transpose(1, 2)
    raise ValueError(f"unknown layout {layout!r}")


def from_canonical(y: torch.Tensor, layout: str, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_canonical`, shaped like the native tensor ``like``."""
    if layout == "BTU":
        return y
    if layout == "TBU":
        return y.transpose(0, 1)
    if layout == "BU":
        return y.squeeze(1)
    if layout == "BCHW":
        return y.transpose(1, 2).reshape(like.shape)
    raise ValueError(f"unknown layout {layout!r}")


def _get(obj: Any, index: int) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        return obj[index]
    # ModelOutput-like objects
    if hasattr(obj, "to_tuple"):
        return obj.to_tuple()[index]
    raise TypeError(f"cannot find a tensor in {type(obj).__name__}")


def _put(obj: Any, index: int, value: torch.Tensor) -> Any:
    if isinstance(obj, torch.Tensor):
        return value
    if isinstance(obj, tuple):
        return obj[:index] + (value,) + obj[index + 1 :]
    if isinstance(obj, list):
        return obj[:index] + [value] + obj[index + 1 :]
    if hasattr(obj, "to_tuple"):
        key = list(obj.keys())[index]
        obj[key] = value
        return obj
    raise TypeError(f"cannot replace a tensor in {type(obj).__name__}")


class Electrodes:
    """Implant electrodes at sites; read them, edit them, or both.

    Parameters
    ----------
    model
        The module the sites' paths refer to.
    sites
        The sites to implant (see :meth:`Subject.sites`).
    read
        Keep each site's canonical ``[B, T, U]`` tensor in :attr:`data` (detached).
    edits
        Site name -> function ``f(x, site) -> x'`` applied to the canonical view
        before it is read; a list of functions is applied in order.  The edit must
        return a tensor of the same shape; it should not modify ``x`` in place.
    on_read
        Called as ``on_read(site, x)`` with the canonical (edited) tensor right when
        the site fires, instead of storing it; the recorder pools here so full
        activations are never kept.
    sites_to_read
        Restrict reading to these site names (default: every site).

    Notes
    -----
    Hooks exist only inside the ``with`` block; leaving it (also on error)
    removes every hook, so the model is untouched outside the context.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sites: Sequence[Site],
        *,
        read: bool = True,
        edits: Mapping[str, Edit | Sequence[Edit]] | None = None,
        on_read: OnRead | None = None,
        sites_to_read: Iterable[str] | None = None,
    ) -> None:
        self.model = model
        self.sites = list(sites)
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("site names must be unique")
        by_name = {s.name: s for s in self.sites}
        self.edits: dict[str, list[Edit]] = {}
        for name, fn in (edits or {}).items():
            if name not in by_name:
                raise NeuroprobeError(f"cannot edit site {name!r}: it is not among the implanted sites.")
            self.edits[name] = list(fn) if isinstance(fn, (list, tuple)) else [fn]
        self.read = read or on_read is not None
        self.on_read = on_read
        self.reading = set(sites_to_read) if sites_to_read is not None else set(names)
        self.data: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[tuple[str, str], int] = defaultdict(int)
        self._fired: set[str] = set()
        self._depth = 0  # how many modules on the way to a site are running

    # ----------------------------------------------------------------- hooks
    def _process(self, site_list: list[Site], key: tuple[str, str], native_obj: Any) -> Any:
        interrupts.check()  # Ctrl-C ends a forward pass here, between modules
        call = self._calls[key]
        self._calls[key] = call + 1
        for site in site_list:
            if site.call is not None and site.call != call:
                continue
            native = _get(native_obj, site.index)
            x = to_canonical(native, site.layout)
            fns = self.edits.get(site.name)
            if site.sae is not None:  # a feature site: its units are the SAE's features of the source activation
                if not (fns or (self.read and site.name in self.reading)):
                    continue
                check_width(site, x)
                f = site.sae.encode(x)
                if fns:
                    g = f
                    for fn in fns:
                        g = fn(g, site)
                    if g.shape != f.shape:
                        raise RuntimeError(f"edit at {site.name} changed the shape {tuple(f.shape)} -> {tuple(g.shape)}")
                    y = edit_source(site.sae, x, f, g)
                    if y is not x:
                        native_obj = _put(native_obj, site.index, from_canonical(y, site.layout, native))
                    f = g
                x = f
            elif fns:
                y = x
                for fn in fns:
                    y = fn(y, site)
                if y.shape != x.shape:
                    raise RuntimeError(f"edit at {site.name} changed the shape {tuple(x.shape)} -> {tuple(y.shape)}")
                native_obj = _put(native_obj, site.index, from_canonical(y, site.layout, native))
                x = y
            if self.read and site.name in self.reading:
                if site.call is None and site.name in self._fired:
                    raise NeuroprobeError(
                        f"module {site.module!r} fired more than once in one forward pass; "
                        f"declare its site pattern with calls=N so each call becomes its own site."
                    )
                self._fired.add(site.name)
                if self.on_read is not None:
                    self.on_read(site, x.detach())
                else:
                    self.data[site.name] = x.detach()
        return native_obj

    def reset(self) -> None:
        """Forget call counts and stored data (called automatically at each top-level forward)."""
        self._calls.clear()
        self._fired.clear()
        self._depth = 0
        self.data = {}

    def __enter__(self) -> "Electrodes":
        self._depth = 0
        groups: dict[tuple[str, str], list[Site]] = defaultdict(list)
        for site in self.sites:
            groups[(site.module, site.direction)].append(site)
        for site_list in groups.values():  # feature sites first: their edits reach the source site's reading
            site_list.sort(key=lambda s: s.sae is None)
        try:
            for (module_name, direction), site_list in groups.items():
                try:
                    module = self.model.get_submodule(module_name)
                except AttributeError:
                    raise NeuroprobeError(f"site module {module_name!r} does not exist in this model.") from None
                key = (module_name, direction)
                if direction == "output":

                    def hook(mod, args, output, _sites=site_list, _key=key):
                        return self._process(_sites, _key, output)

                    self._handles.append(module.register_forward_hook(hook))
                else:

                    def pre_hook(mod, args, kwargs, _sites=site_list, _key=key):
                        if args:
                            new_args = self._process(_sites, _key, tuple(args))
                            return new_args, kwargs
                        # input passed by keyword: use the first tensor keyword argument
                        k = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
                        new = self._process(_sites, _key, kwargs[k])
                        kwargs = dict(kwargs)
                        kwargs[k] = new
                        return args, kwargs

                    self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            self._track_passes()
        except BaseException:
            self.remove()
            raise
        return self

    def _track_passes(self) -> None:
        # A forward pass starts when the outermost of the modules on the way to a site
        # starts (the model itself, or a sub-model such as CLIP's text tower called by
        # get_text_features); call counts restart there.
        names = {""}
        for site in self.sites:
            parts = site.module.split(".")
            names.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        for name in sorted(names):
            module = self.model.get_submodule(name) if name else self.model
            self._handles.append(module.register_forward_pre_hook(self._enter, prepend=True))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        interrupts.check()  # Ctrl-C ends a forward pass here, before the module runs
        if self._depth == 0:
            self._new_pass()
        self._depth += 1

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)

    def _new_pass(self) -> None:
        self._calls.clear()
        self._fired.clear()

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def watch_calls(
    model: torch.nn.Module,
    modules: Sequence[str],
    run: Callable[[], Any],
    on_call: Callable[[str, tuple, dict, Any], None],
    on_start: Callable[[str], None] | None = None,
) -> Any:
    """Run ``run()`` calling ``on_call(name, args, kwargs, output)`` after every call of each of ``modules``.

    ``on_start(name)`` is called when each starts.  Used by batched lesions
    (:mod:`neuroprobe.lesions.staged`) to record the intact pass of every block; the
    hooks exist only while ``run()`` runs.  Returns what ``run()`` returns.
    """
    handles = []
    try:
        for name in modules:
            module = model.get_submodule(name) if name else model
            if on_start is not None:
                handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: on_start(_n)))
            handles.append(module.register_forward_hook(lambda m, a, k, o, _n=name: on_call(_n, a, k, o), with_kwargs=True))
        return run()
    finally:
        for h in handles:
            h.remove()


def capture_calls(model: torch.nn.Module, modules: Sequence[str], run: Callable[[], Any]) -> dict[str, list[tuple[tuple, dict]]]:
    """Run ``run()`` and return the arguments each of ``modules`` was called with.

    The block's positional and keyword arguments (hidden state, attention masks in
    whatever form the library builds them) are kept, in call order (:func:`watch_calls`).
    The hooks exist only while ``run()`` runs.
    """
    got: dict[str, list[tuple[tuple, dict]]] = {m: [] for m in modules}
    watch_calls(model, modules, run, lambda name, args, kwargs, output: got[name].append((tuple(args), dict(kwargs))))
    return got


@contextlib.contextmanager
def stand_ins(model: torch.nn.Module, forwards: Mapping[str, Callable[[Callable[..., Any]], Callable[..., Any]]]) -> Iterator[None]:
    """Inside the block, module ``name`` computes ``forwards[name](original_forward)(*args, **kwargs)``.

    Its hooks still run around the call.  Used by batched lesions to answer blocks upstream
    of a lesion from a recorded intact pass; the original ``forward`` is back on leaving (also on error).
    """
    swapped = []
    try:
        for name, make in forwards.items():
            module = model.get_submodule(name)
            swapped.append((module, module.__dict__.get("forward")))
            module.forward = make(module.forward)
        yield
    finally:
        for module, old in swapped:
            if old is None:
                del module.forward
            else:
                module.forward = old


def record_once(model: torch.nn.Module, sites: Sequence[Site], run: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """Run ``run()`` with electrodes reading ``sites``; return their canonical tensors."""
    with Electrodes(model, sites) as el:
        run()
    return el.data
