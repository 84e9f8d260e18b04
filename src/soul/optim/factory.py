"""`build_optimizer(name, params, **cfg)`: one factory for every optimizer an objective can be run with.

Built in: ``adamw`` and ``sgd`` (torch), ``sophia`` (:class:`SophiaG`; with ``estimator`` ``kfac`` or
``ekfac`` :class:`~soul.optim.ksophia.KroneckerSophia`, which also takes ``damping_relative``),
``signum`` (:class:`Signum`, Sophia without curvature) and ``lion`` (:class:`Lion`). Any optimizer class of
an installed library is reachable as ``"LIBRARY:Class"``: ``torch:SGD`` / ``torch:RAdam`` (``torch.optim``),
``pytorch_optimizer:SOAP``, ``pytorch_optimizer:AdaHessian`` … (``torch`` means ``torch.optim``). Options are
the class's own constructor keywords.

A preset is data, so naming a library must not run code that came with it: ``LIBRARY`` (its top-level
package) must be in `ALLOWED_LIBRARIES` or in ``$SOUL_OPTIMIZER_LIBRARIES`` (comma-separated, the user's
explicit opt-in), and the package found must be the copy an installed distribution put there (its file is
listed in that distribution's RECORD). A ``pytorch_optimizer.py`` or ``evil.py`` in the working directory
(on ``sys.path`` under ``python -m soul.cli``) or anywhere else on ``sys.path`` is refused without importing it.

Some optimizers estimate curvature inside ``step()`` from Hessian-vector products of the gradients
(pytorch_optimizer's AdaHessian and SophiaH): they need the training loss back-propagated with
``create_graph=True``. :func:`needs_create_graph` tells the training loop so. The signal is, in order:
a class attribute ``requires_create_graph``; the names in ``CREATE_GRAPH_OPTIMIZERS``; and a ``step`` whose
source calls ``compute_hutchinson_hessian`` (pytorch_optimizer's helper for that product; the library
documents the requirement only in docstrings).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from soul.optim.ksophia import KRONECKER_ESTIMATORS, KroneckerSophia
from soul.optim.lion import Lion
from soul.optim.signum import Signum
from soul.optim.sophia import ESTIMATORS, SophiaG


def _adamw(params: Any, **cfg: Any) -> torch.optim.Optimizer:
    # torch picks its per-tensor loop on CPU (foreach only on accelerators): measured 1.4 s vs ~0.37 s per step
    # on SmolLM2's parameters, which would make the first-order baseline look slow for no reason of its own.
    cfg.setdefault("foreach", True)
    return torch.optim.AdamW(params, **cfg)


def _sgd(params: Any, **cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, **cfg)


def _sophia(params: Any, **cfg: Any) -> torch.optim.Optimizer:
    if "gamma" in cfg:  # the Sophia paper's name for rho
        if "rho" in cfg:
            raise ValueError("sophia: give either 'rho' or its alias 'gamma', not both")
        cfg["rho"] = cfg.pop("gamma")
    # estimator kfac / ekfac: the same rule with a Kronecker preconditioner (soul.optim.ksophia)
    estimator = cfg.get("estimator", "gnb")
    if estimator in KRONECKER_ESTIMATORS:
        return KroneckerSophia(params, **cfg)
    if estimator not in ESTIMATORS:
        raise ValueError(f"sophia: estimator must be one of {[*ESTIMATORS, *KRONECKER_ESTIMATORS]}, "
                         f"got {estimator!r}")
    if "damping_relative" in cfg:
        raise ValueError(f"sophia: damping_relative applies to the Kronecker estimators "
                         f"{list(KRONECKER_ESTIMATORS)} only, not to estimator {estimator!r}")
    return SophiaG(params, **cfg)


def _signum(params: Any, **cfg: Any) -> torch.optim.Optimizer:
    return Signum(params, **cfg)


def _lion(params: Any, **cfg: Any) -> torch.optim.Optimizer:
    return Lion(params, **cfg)


# name -> (builder, the class whose constructor defines the accepted options)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], type]] = {
    "adamw": (_adamw, torch.optim.AdamW),
    "sgd": (_sgd, torch.optim.SGD),
    "sophia": (_sophia, SophiaG),
    "signum": (_signum, Signum),
    "lion": (_lion, Lion),
}
_ALIASES = {"sophiag": "sophia", "sophia-g": "sophia", "adam_w": "adamw"}
_EXTRA_OPTIONS = {"sophia": {"gamma", "damping_relative"}}  # damping_relative: KroneckerSophia's
# Library classes known to need backward(create_graph=True) (see the module docstring for the other signals).
CREATE_GRAPH_OPTIMIZERS = {("pytorch_optimizer", "AdaHessian"), ("pytorch_optimizer", "SophiaH")}
_LIBRARY_MODULES = {"torch": "torch.optim"}
# Top-level packages `LIBRARY:Class` may import (module docstring); more with $SOUL_OPTIMIZER_LIBRARIES.
ALLOWED_LIBRARIES = ("torch", "pytorch_optimizer")
LIBRARIES_ENV = "SOUL_OPTIMIZER_LIBRARIES"


def is_external(name: str) -> bool:
    """Whether `name` names a library class (``"LIBRARY:Class"``) rather than a built-in optimizer."""
    return ":" in str(name)


def _split(name: str) -> tuple[str, str]:
    library, _, cls_name = str(name).partition(":")
    if not library or not cls_name:
        raise ValueError(f"optimizer {name!r}: expected 'LIBRARY:Class', e.g. 'torch:SGD' or "
                         "'pytorch_optimizer:SOAP'")
    return library, cls_name


def _optimizer_classes(module: Any) -> list[str]:
    return sorted(n for n, v in vars(module).items()
                  if inspect.isclass(v) and issubclass(v, torch.optim.Optimizer) and not n.startswith("_"))


def allowed_libraries() -> list[str]:
    extra = [n.strip() for n in os.environ.get(LIBRARIES_ENV, "").split(",") if n.strip()]
    return [*ALLOWED_LIBRARIES, *extra]


def _installed_by_a_distribution(top: str) -> bool:
    """Whether the package `top` that an import would load is a file an installed distribution recorded."""
    spec = importlib.util.find_spec(top)  # a top-level name: located, not imported
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return False
    return _recorded(top, os.path.realpath(spec.origin))


@functools.cache
def _recorded(top: str, origin: str) -> bool:
    def candidates() -> Iterable[Any]:
        # Usually named like its package (torch, pytorch_optimizer); the full lookup scans every distribution.
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            yield importlib.metadata.distribution(top)
        for dist_name in importlib.metadata.packages_distributions().get(top, []):
            yield importlib.metadata.distribution(dist_name)

    name = os.path.basename(origin)
    return any(os.path.realpath(dist.locate_file(f)) == origin
               for dist in candidates() for f in dist.files or () if f.name == name)


def check_library(name: str) -> None:
    """Refuse (ValueError, nothing imported) a ``LIBRARY:Class`` whose library may not be imported (module
    docstring)."""
    library, _cls = _split(name)
    top = library.split(".")[0]
    allowed = allowed_libraries()
    if top not in allowed:
        raise ValueError(f"optimizer {name!r}: {top!r} is not an allowed optimizer library ({', '.join(allowed)}); "
                         f"soul imports no other module for a preset or option (add an installed library to "
                         f"${LIBRARIES_ENV}, comma-separated, to allow it)")
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise ValueError(f"optimizer {name!r}: the library {top!r} is not installed (no module named {top!r}); "
                         "install it (e.g. pip install "
                         f"{top.replace('_', '-')}) or choose a built-in optimizer: {sorted(OPTIMIZERS)}")
    if not _installed_by_a_distribution(top):
        raise ValueError(f"optimizer {name!r}: the {top!r} found first on the import path "
                         f"({spec.origin}) is not the installed distribution's copy; "
                         "refusing to import it (a file of that name in the working directory or on PYTHONPATH?)")


def resolve_optimizer_class(name: str) -> type:
    """The optimizer class named ``"LIBRARY:Class"`` (``torch`` = ``torch.optim``); clear errors otherwise."""
    check_library(name)
    library, cls_name = _split(name)
    module_name = _LIBRARY_MODULES.get(library, library)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"optimizer {name!r}: the library {library!r} is not installed ({err}); install it "
                         f"(e.g. pip install {library.replace('_', '-')}) or choose a built-in optimizer: "
                         f"{sorted(OPTIMIZERS)}") from None
    cls = getattr(module, cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        known = [k for k in _optimizer_classes(module) if k != "Optimizer"]
        lowered = {k.lower(): k for k in known}
        close = [lowered[k] for k in difflib.get_close_matches(cls_name.lower(), list(lowered), n=5, cutoff=0.5)]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"optimizer {name!r}: {module_name} has no optimizer class {cls_name!r} (names are "
                         f"case-sensitive).{hint} Its optimizer classes: {', '.join(known) or 'none found'} "
                         f"(python -c \"import {module_name} as m; print(dir(m))\" lists everything).")
    return cls


def needs_create_graph(optimizer_or_class: Any) -> bool:
    """Whether the optimizer computes Hessian-vector products from ``.grad`` in ``step()`` (module docstring)."""
    cls = optimizer_or_class if inspect.isclass(optimizer_or_class) else type(optimizer_or_class)
    marker = getattr(cls, "requires_create_graph", None)
    if marker is not None:
        return bool(marker)
    if (cls.__module__.split(".")[0], cls.__name__) in CREATE_GRAPH_OPTIMIZERS:
        return True
    try:
        return "compute_hutchinson_hessian" in inspect.getsource(cls.step)
    except (OSError, TypeError):
        return False


def optimizer_options(name: str) -> list[str]:
    """The keyword options `build_optimizer(name, ...)` accepts (for a library class: its constructor's)."""
    if is_external(name):
        cls = resolve_optimizer_class(name)
        return sorted(p.name for p in inspect.signature(cls.__init__).parameters.values()
                      if p.name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    _, cls = OPTIMIZERS[_key(name)]
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    return sorted(set(names) | _EXTRA_OPTIONS.get(_key(name), set()))


def _key(name: str) -> str:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)} or 'LIBRARY:Class' "
                         "(e.g. 'torch:SGD', 'pytorch_optimizer:SOAP')")
    return key


def build_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                    **cfg: Any) -> torch.optim.Optimizer:
    """Build a built-in optimizer (``adamw``, ``sgd``, ``sophia``, ``signum``, ``lion``) or ``LIBRARY:Class``.

    ``cfg`` are the constructor's keyword options (``lr``, ``weight_decay``, ``betas``, ...); lists from
    YAML are turned into tuples for ``betas``. Unknown names and options raise ``ValueError`` (a library
    class whose constructor takes ``**kwargs`` gets its options unchecked).
    """
    if isinstance(cfg.get("betas"), list):
        cfg["betas"] = tuple(cfg["betas"])
    if is_external(name):
        cls = resolve_optimizer_class(name)
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
        allowed = optimizer_options(name)
        unknown = sorted(set(cfg) - set(allowed))
        if unknown and not accepts_any:
            raise ValueError(f"unknown option(s) {unknown} for optimizer {name!r}; accepted: {allowed}")
        try:
            return cls(params, **cfg)
        except (TypeError, ValueError) as err:
            raise ValueError(f"optimizer {name!r} rejected its options {sorted(cfg)}: {err}") from err
    key = _key(name)
    allowed = optimizer_options(key)
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for optimizer {key!r}; accepted: {allowed}")
    builder, _ = OPTIMIZERS[key]
    return builder(params, **cfg)
