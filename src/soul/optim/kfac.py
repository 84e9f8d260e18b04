r"""K-FAC and EK-FAC: Kronecker-factored Gauss-Newton (true Fisher) curvature of a causal LM, and its damped inverse.

Target. The curvature approximated is the Gauss-Newton matrix of the **mean per-token loss** over the
:math:`B` loss-bearing tokens of all the batches passed (labels != -100 after the causal shift, on all
processes together):

.. math::

    L = \frac1B\sum_{i=1}^{B}\ell_i, \qquad
    \mathrm{GGN} = \frac1B\sum_{i=1}^{B} J_i^\top H_i J_i, \qquad H_i = \mathrm{diag}(p_i) - p_ip_i^\top,

with :math:`p_i = \mathrm{softmax}(z_i)` and :math:`J_i = \partial z_i/\partial\theta`. For softmax
cross-entropy the GGN equals the true Fisher, :math:`\mathbb E_{\hat y_i\sim p_i}[\nabla\ell_i(\hat y_i)
\nabla\ell_i(\hat y_i)^\top]` — the same matrix whose diagonal :mod:`soul.optim.hessian`'s GNB estimates.

Covered modules. Every ``nn.Linear`` — and GPT-2's ``Conv1D`` (:math:`y = xW + b`, treated as a Linear with
weight :math:`W^\top`) — whose weight is trainable, except the output embedding (``lm_head``, from
``get_output_embeddings()``) and any weight shared with another module (a tied ``lm_head``): in a HF causal
LM these are the attention and MLP projections of the transformer blocks. ``modules=`` overrides the choice.
Each covered module :math:`s = W a (+b)` with :math:`W\in\mathbb R^{o\times n}` gets one Kronecker block;
with a trainable bias the input is augmented, :math:`\tilde a = [a; 1]`, and the block covers
:math:`\tilde W = [W\ b]` (flattened row-major, so the block is ``torch.kron(G, A)``). At a position
:math:`t` of a sequence, :math:`a_t` is the module's input there and :math:`g_t = \partial\hat L/\partial
s_t` the gradient of :math:`\hat L = \sum_i \ell(z_i, \hat y_i)` (the **sum**, unscaled) with respect to the
module's output, labels :math:`\hat y` drawn as ``fisher`` says. The positions :math:`\mathcal T` are the
loss-bearing ones only — :math:`t` with ``labels[t+1] != -100``; prompt, padding and the last position add
nothing (masked in the hooks):

.. math::

    A = \frac1{B}\sum_{t\in\mathcal T} \tilde a_t\tilde a_t^\top, \qquad
    G = \frac1{B}\,\mathbb E_{\hat y}\Big[\sum_{t\in\mathcal T} g_tg_t^\top\Big], \qquad
    \mathrm{GGN}_W \approx G\otimes A.

(A module called :math:`R` times per forward adds :math:`R` rows per token and :math:`A` is divided by the
number of rows instead.) This is K-FAC's "expand" form: each token is treated as an example of its own, so
it is exact for one linear layer on independent tokens (the tests check that to 1e-8) and an approximation
where attention mixes positions. With one token and one layer, :math:`G = H` and :math:`A = \tilde a\tilde
a^\top`, so :math:`G\otimes A = J^\top HJ` exactly.

``fisher``: ``mc`` (default) draws :math:`\hat y_i\sim p_i` as GNB does (``mc_samples`` independent draws,
averaged; the draws of different tokens are independent, so the cross-token terms of
:math:`g_tg_t^\top` vanish in expectation); ``empirical`` uses the data labels (the empirical Fisher: the
cross-token terms of a sequence do not cancel, a biased proxy); ``exact`` takes the expectation over all
:math:`V` labels exactly, by one backward per (loss token :math:`i`, class :math:`c`) of
:math:`\sqrt{p_{ic}}\,\ell(z_i, c)`, since :math:`\sum_c p_c(p-e_c)(p-e_c)^\top = \mathrm{diag}(p) -
pp^\top` — :math:`B\cdot V` backward passes, for tests on tiny vocabularies only.

EK-FAC (George et al., 2018). Eigendecompose :math:`A = Q_A\Lambda_AQ_A^\top`, :math:`G = Q_G\Lambda_G
Q_G^\top` (float64), then re-fit the diagonal in the Kronecker eigenbasis from per-example gradients
:math:`D_e`:

.. math::

    S_{jk} = \frac1B\sum_e \big(Q_G^\top D_e Q_A\big)_{jk}^2, \qquad
    \mathrm{GGN}_W \approx (Q_G\otimes Q_A)\,\mathrm{diag}(\mathrm{vec}\,S)\,(Q_G\otimes Q_A)^\top.

An example :math:`e` is a **sequence** for ``mc``/``empirical`` (:math:`D_e = \sum_t g_t\tilde a_t^\top` over
all its real, attended positions, prompt included — the true gradient of the sequence's sampled loss, so
:math:`\mathbb E[S]` is the exact diagonal of the GGN block in that basis) and one (loss token, class) pair
for ``exact`` (then :math:`S` *is* that diagonal, and EK-FAC's Frobenius error against the GGN block is
never above K-FAC's, whose :math:`\Lambda_G\otimes\Lambda_A` is another diagonal in the same basis). The
corrections take a second pass over the batches (fresh label draws).

Damped inverse (``inverse_apply``), exact in the eigenbasis, per block:

.. math::

    (C + \lambda I)^{-1}v = Q_G\Big[\big(Q_G^\top V Q_A\big) \oslash (D + \lambda)\Big]Q_A^\top, \qquad
    D = \lambda_G\lambda_A^\top \ \text{(K-FAC)}, \quad D = S \ \text{(EK-FAC)},

with :math:`V` the gradient as an :math:`o\times\tilde n` matrix. ``damping`` is an absolute :math:`\lambda`
used for every block; ``damping_relative`` :math:`r` (default 0.1, as for one-shot influence) sets
:math:`\lambda = r\,\bar D` **per block**, :math:`\bar D` the mean eigenvalue of that block (K-FAC:
:math:`\overline{\lambda_G}\,\overline{\lambda_A} = \mathrm{tr}(G\otimes A)/(o\tilde n)`; EK-FAC: the mean
of :math:`S`; a diagonal tensor: the mean of :math:`h`). ``apply`` is the product :math:`Cv` (no damping),
for the quadratic model's predicted loss change.

Everything else. Trainable parameters outside the covered modules (the embedding / tied ``lm_head``, norm
gains, biases of uncovered modules) get a diagonal :math:`h` in the same normalisation: with ``mc`` the GNB
estimate of :mod:`soul.optim.hessian` from the very same label draws (per batch :math:`b` and draw,
:math:`h \mathrel{+}= \hat g_b\odot\hat g_b`, :math:`\hat g_b` the gradient of the batch's summed sampled
loss, then :math:`h \leftarrow h/(B\cdot\text{draws})` — with one batch exactly
``estimate_hessian(estimator="gnb")``'s :math:`B\,\hat g\odot\hat g`); with ``empirical`` the same formula
with the data labels; with ``exact`` the exact GGN diagonal. So ``inverse_apply`` covers every trainable
parameter: block-diagonal over modules, Kronecker inside a covered module, diagonal elsewhere.

Distributed. Under ``torch.distributed`` each process passes its own batches; sums (:math:`\sum\tilde a
\tilde a^\top`, :math:`\sum gg^\top`, :math:`S`'s sums, the exact diagonal) and counts (:math:`B`, rows) are
all-reduced and divided by the *global* counts (not a mean of per-process means), and the ``mc``/
``empirical`` diagonal all-reduces each batch's gradient before squaring, as GNB does for a global batch
(so every process must pass the same number of batches). Eigendecompositions are computed from the reduced
factors, so all processes hold the same curvature, equal to one process's on all the data. Process
:math:`r` draws labels with seed ``seed + r``. Pass the unwrapped model (a DDP wrapper is unwrapped);
FSDP-sharded parameters are not supported.

Precision. Factors are accumulated and stored in ``promote(weight dtype, float32)`` (fp32 for bf16/fp32
models, fp64 for fp64 models — the tests use fp64); eigendecompositions are computed in float64 and stored
in the factor dtype. The model runs in eval mode (no dropout) and without gradient checkpointing; ``.grad``
is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from soul.losses import IGNORE_INDEX, upcast
from soul.optim._dist import all_reduce_sum, is_distributed
from soul.optim.hessian import _as_batches

Batch = dict[str, Any]
Grads = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
KINDS = ("kfac", "ekfac")
FISHERS = ("mc", "empirical", "exact")
DEFAULT_DAMPING_RELATIVE = 0.1  # the same default as soul.optim.influence's diagonal Newton step
STATE_FORMAT = "soul.kfac/1"


def _is_conv1d(module: torch.nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (y = x @ W + b, W: in x out), recognised by duck typing so that soul.optim
    # does not import transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _linear_like(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or _is_conv1d(module)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    if type(model).__name__ == "DistributedDataParallel":
        model = model.module
    if type(model).__name__ in ("FullyShardedDataParallel", "FSDPModule") or any(
            type(p).__name__ == "DTensor" or getattr(p, "_is_flat_param", False) for p in model.parameters()):
        raise NotImplementedError("K-FAC needs whole (unsharded) weights; FSDP-sharded models are not supported")
    return model


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _check_choice(where: str, option: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: {option} must be one of {list(allowed)}, got {value!r}")


def _positive(where: str, option: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{where}: {option} must be a finite number > 0, got {value!r}")
    return number


def covered_modules(model: torch.nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """Names of the modules that get a Kronecker block (module docstring: trainable Linear/Conv1D weights,
    not the output embedding, not shared weights). ``modules`` checks and returns an explicit choice."""
    model = _unwrap(model)
    by_name = dict(model.named_modules())
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    get_out = getattr(model, "get_output_embeddings", None)
    output_embedding = get_out() if callable(get_out) else None

    def problem(name: str, m: torch.nn.Module) -> str | None:
        if not _linear_like(m):
            return f"is a {type(m).__name__}, not nn.Linear or Conv1D"
        if not m.weight.requires_grad:
            return "has a frozen weight"
        if uses[id(m.weight)] > 1:
            return "shares its weight with another module (tied)"
        return None

    if modules is None:
        return [n for n, m in by_name.items() if m is not output_embedding and _linear_like(m)
                and problem(n, m) is None]
    names = list(modules)
    for n in names:
        if n not in by_name:
            raise ValueError(f"fit_kfac: modules names {n!r}, which is not a module of the model")
        why = problem(n, by_name[n])
        if why:
            raise ValueError(f"fit_kfac: module {n!r} {why}; it cannot get a Kronecker block")
    return names


@dataclass
class _Block:
    """One covered module's Kronecker factors (see the module docstring for the math)."""

    weight: str  # parameter names
    bias: str | None
    transposed: bool  # Conv1D: the parameter is W^T
    A: torch.Tensor  # (n~, n~)
    G: torch.Tensor  # (o, o)
    QA: torch.Tensor | None = None
    LA: torch.Tensor | None = None
    QG: torch.Tensor | None = None
    LG: torch.Tensor | None = None
    S: torch.Tensor | None = None  # EK-FAC eigenvalues, (o, n~)

    def eig(self) -> None:
        # float64 eigendecomposition; rounding can leave tiny negative eigenvalues of a PSD factor: clamp.
        for f in ("A", "G"):
            mat = getattr(self, f)
            evals, evecs = torch.linalg.eigh(mat.double())
            setattr(self, "L" + f, evals.clamp_min(0).to(mat.dtype))
            setattr(self, "Q" + f, evecs.to(mat.dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.G, self.QA, self.LA, self.QG, self.LG, self.S) if t is not None]

    def to_matrix(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = named[self.weight].to(self.A.dtype)
        w = w.t() if self.transposed else w
        return torch.cat([w, named[self.bias].to(w.dtype)[:, None]], dim=1) if self.bias else w

    def from_matrix(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.bias:
            w, b = m[:, :-1], m[:, -1]
        else:
            w, b = m, None
        out = {self.weight: (w.t() if self.transposed else w).contiguous()}
        if b is not None:
            out[self.bias] = b.contiguous()
        return out

    def eigenvalues(self, kind: str) -> torch.Tensor:
        assert self.LG is not None and self.LA is not None
        return self.S if kind == "ekfac" else self.LG[:, None] * self.LA[None, :]


def _draw_units(fisher: str, probs: torch.Tensor, data_labels: torch.Tensor, rows: torch.Tensor, mc_samples: int,
                generator: torch.Generator | None) -> Iterable[tuple[torch.Tensor, int | None]]:
    """Yield (dL^/dz at the loss tokens, example row) for each backward: row None = one example per sequence."""
    vocab = probs.shape[-1]
    if fisher == "exact":
        for j in range(probs.shape[0]):
            for c in range(vocab):
                weight = float(probs[j, c]) ** 0.5
                if weight == 0.0:
                    continue
                gz = torch.zeros_like(probs)
                gz[j] = probs[j] * weight
                gz[j, c] -= weight
                yield gz, int(rows[j])
        return
    draws = mc_samples if fisher == "mc" else 1
    for _ in range(draws):
        if probs.shape[0] == 0:
            yield probs, None  # still a backward: the diagonal's per-batch all-reduce needs every process
            continue
        if fisher == "mc":
            # exactly gnb_backward's draw (same probabilities, same call), so the diagonal is its estimate
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            labels = data_labels
        gz = probs.clone()
        gz[torch.arange(probs.shape[0], device=probs.device), labels] -= 1.0
        yield gz, None


class KroneckerCurvature:
    """A fitted K-FAC / EK-FAC curvature of one model; build it with :func:`fit_kfac`.

    Attributes: ``kind``, ``fisher``, ``mc_samples``, ``tokens`` (global B), ``param_names``/``params`` (the
    trainable parameters, in ``model.named_parameters()`` order: the order a list passed to
    :meth:`inverse_apply` / :meth:`apply` must follow), ``blocks`` (module name -> factors) and ``diag``
    (parameter name -> diagonal estimate).
    """

    def __init__(self, model: torch.nn.Module, *, kind: str, fisher: str, mc_samples: int, tokens: int,
                 blocks: dict[str, _Block], diag: dict[str, torch.Tensor]) -> None:
        named = _trainable(_unwrap(model))
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.kind, self.fisher, self.mc_samples, self.tokens = kind, fisher, mc_samples, tokens
        self.blocks, self.diag = blocks, diag
        self._block_of = {n: b for b in blocks.values() for n in (b.weight, b.bias) if n is not None}

    # -- applying it ---------------------------------------------------------------------------------------
    def _named(self, vec: Grads, where: str) -> tuple[dict[str, torch.Tensor], bool]:
        if isinstance(vec, Mapping):
            named = dict(vec)
            unknown = [n for n in named if n not in self._block_of and n not in self.diag]
            if unknown:
                raise ValueError(f"KroneckerCurvature.{where}: unknown parameter names {unknown[:5]}; expected "
                                 "names of the trainable parameters the curvature was fitted on")
            return named, False
        vec = list(vec)
        if len(vec) != len(self.param_names):
            raise ValueError(f"KroneckerCurvature.{where}: a list must hold one tensor per trainable parameter "
                             f"({len(self.param_names)}, in named_parameters() order), got {len(vec)}")
        return dict(zip(self.param_names, vec)), True

    def _map(self, vec: Grads, where: str, block_fn: Any, diag_fn: Any) -> Grads:
        named, as_list = self._named(vec, where)
        out: dict[str, torch.Tensor] = {}
        for module, block in self.blocks.items():
            present = [n for n in (block.weight, block.bias) if n is not None and n in named]
            if not present:
                continue
            if len(present) == 1 and block.bias is not None:
                raise ValueError(f"KroneckerCurvature.{where}: module {module!r} has one Kronecker block for "
                                 f"its weight and bias; give both {block.weight!r} and {block.bias!r} or neither")
            out.update(block.from_matrix(block_fn(module, block, block.to_matrix(named))))
        for name, h in self.diag.items():
            if name in named:
                out[name] = diag_fn(name, h, named[name].to(h.dtype))
        ordered = {n: out[n].view_as(named[n]) for n in named}
        return list(ordered.values()) if as_list else ordered

    def _damping(self, damping: float | None, damping_relative: float | None) -> tuple[float | None, float | None]:
        where = "KroneckerCurvature.inverse_apply"
        if damping is not None and damping_relative is not None:
            raise ValueError(f"{where}: give either damping (absolute) or damping_relative (a fraction of each "
                             f"block's mean eigenvalue), not both; got damping={damping!r}, "
                             f"damping_relative={damping_relative!r}")
        if damping is not None:
            return _positive(where, "damping", damping), None
        if damping_relative is None:
            return None, DEFAULT_DAMPING_RELATIVE
        return None, _positive(where, "damping_relative", damping_relative)

    @staticmethod
    def _lam(name: str, eigenvalues: torch.Tensor, damping: float | None, relative: float | None) -> float:
        if damping is not None:
            return damping
        assert relative is not None
        mean = float(eigenvalues.double().mean())
        if not mean > 0:
            raise ValueError(f"KroneckerCurvature.inverse_apply: the curvature of {name!r} is zero, so a damping "
                             "relative to it is zero too; give an absolute damping")
        return relative * mean

    def inverse_apply(self, grads: Grads, *, damping_relative: float | None = None,
                      damping: float | None = None) -> Grads:
        """:math:`(C + \\lambda I)^{-1}v` for a vector given as {parameter name: tensor} (any subset of the
        trainable parameters; a covered module's weight and bias together) or a list in ``params`` order.
        Returns the same form, in the factors' dtype. ``damping_relative`` (default 0.1) is per block
        (module docstring); ``damping`` is absolute."""
        damping, relative = self._damping(damping, damping_relative)

        def block_fn(module: str, b: _Block, m: torch.Tensor) -> torch.Tensor:
            assert b.QG is not None and b.QA is not None
            d = b.eigenvalues(self.kind)
            rotated = b.QG.t() @ m @ b.QA
            return b.QG @ (rotated / (d + self._lam(module, d, damping, relative))) @ b.QA.t()

        def diag_fn(name: str, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return v / (h + self._lam(name, h, damping, relative))

        return self._map(grads, "inverse_apply", block_fn, diag_fn)

    def apply(self, vec: Grads) -> Grads:
        """The curvature-vector product :math:`Cv` (undamped), in the same forms as :meth:`inverse_apply`."""

        def block_fn(module: str, b: _Block, m: torch.Tensor) -> torch.Tensor:
            if self.kind == "kfac":
                return b.G @ m @ b.A  # (G ⊗ A) vec(M) = vec(G M A) for row-major vec and symmetric A
            assert b.QG is not None and b.QA is not None and b.S is not None
            return b.QG @ ((b.QG.t() @ m @ b.QA) * b.S) @ b.QA.t()

        return self._map(vec, "apply", block_fn, lambda name, h, v: h * v)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the factors, eigenbases, EK-FAC eigenvalues and diagonal estimates."""
        tensors = [t for b in self.blocks.values() for t in b.tensors()] + list(self.diag.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, Any]:
        """Factors and counts (plus, for EK-FAC, the eigenbasis its eigenvalues belong to); K-FAC's
        eigendecomposition is recomputed on load."""
        blocks = {}
        for module, b in self.blocks.items():
            entry: dict[str, Any] = {"weight": b.weight, "bias": b.bias, "transposed": b.transposed,
                                     "A": b.A.clone(), "G": b.G.clone()}
            if self.kind == "ekfac":
                entry.update(QA=b.QA.clone(), QG=b.QG.clone(), S=b.S.clone())
            blocks[module] = entry
        return {"format": STATE_FORMAT, "kind": self.kind, "fisher": self.fisher, "mc_samples": self.mc_samples,
                "tokens": self.tokens, "blocks": blocks, "diag": {n: h.clone() for n, h in self.diag.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load factors saved by :meth:`state_dict` for the same model architecture (names and shapes checked)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"KroneckerCurvature.load_state_dict: expected a {STATE_FORMAT!r} state, got "
                             f"format {state.get('format')!r}")
        if set(state["blocks"]) != set(self.blocks) or set(state["diag"]) != set(self.diag):
            raise ValueError("KroneckerCurvature.load_state_dict: the state covers other modules/parameters than "
                             "this curvature")
        for module, entry in state["blocks"].items():
            b = self.blocks[module]
            if entry["A"].shape != b.A.shape or entry["G"].shape != b.G.shape:
                raise ValueError(f"KroneckerCurvature.load_state_dict: factor shapes of {module!r} differ")
        self.kind, self.fisher = state["kind"], state["fisher"]
        self.mc_samples, self.tokens = int(state["mc_samples"]), int(state["tokens"])
        for module, entry in state["blocks"].items():
            b = self.blocks[module]
            b.A, b.G = entry["A"].to(b.A), entry["G"].to(b.G)
            b.eig()
            if self.kind == "ekfac":
                b.QA, b.QG, b.S = entry["QA"].to(b.A), entry["QG"].to(b.G), entry["S"].to(b.A)
            else:
                b.S = None
        self.diag = {n: h.to(self.diag[n]) for n, h in state["diag"].items()}

    @classmethod
    def from_state_dict(cls, model: torch.nn.Module, state: Mapping[str, Any]) -> KroneckerCurvature:
        """Rebuild a curvature for ``model`` from :meth:`state_dict` without refitting."""
        blocks = {m: _Block(weight=e["weight"], bias=e["bias"], transposed=e["transposed"], A=e["A"].clone(),
                            G=e["G"].clone()) for m, e in state["blocks"].items()}
        curv = cls(model, kind=state["kind"], fisher=state["fisher"], mc_samples=int(state["mc_samples"]),
                   tokens=int(state["tokens"]), blocks=blocks, diag={n: h.clone() for n, h in state["diag"].items()})
        missing = [n for n in curv._block_of if n not in curv.param_names]
        if missing:
            raise ValueError(f"KroneckerCurvature.from_state_dict: the model has no trainable parameters {missing[:5]}")
        curv.load_state_dict(state)
        return curv


class _Capture:
    """Forward hooks that record (input, output) of each covered module for the duration of one forward."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.modules = modules
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in modules}
        self.handles: list[Any] = []

    def __enter__(self) -> _Capture:
        for name, module in self.modules.items():
            def hook(m: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, name: str = name) -> None:
                a = args[0] if args else next(iter(kwargs.values()))
                if not output.requires_grad:
                    raise RuntimeError(f"fit_kfac: the output of {name!r} does not require grad (torch.no_grad or "
                                       "gradient checkpointing?); K-FAC needs its gradient")
                self.calls[name].append((a.detach(), output))
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def fit_kfac(
    model: torch.nn.Module,
    batches: Batch | Sequence[Batch],
    *,
    kind: str = "kfac",
    fisher: str = "mc",
    mc_samples: int = 1,
    seed: int = 0,
    generator: torch.Generator | None = None,
    modules: Sequence[str] | None = None,
) -> KroneckerCurvature:
    """Fit K-FAC (``kind="kfac"``) or EK-FAC (``"ekfac"``) on ``batches`` (a batch or a list of batches with
    ``input_ids``, ``attention_mask``, ``labels``; -100 where no loss is taken) — see the module docstring.

    ``fisher``: ``mc`` (labels sampled from the model, ``mc_samples`` draws), ``empirical`` (data labels) or
    ``exact`` (all labels, tiny vocabularies only). ``seed`` seeds the label draws (process r: seed + r)
    unless a ``generator`` on the model's device is given. ``modules`` overrides the covered modules.
    The model is left in its training mode and its ``.grad`` untouched.
    """
    where = "fit_kfac"
    _check_choice(where, "kind", kind, KINDS)
    _check_choice(where, "fisher", fisher, FISHERS)
    if not (isinstance(mc_samples, int) and not isinstance(mc_samples, bool) and mc_samples >= 1):
        raise ValueError(f"{where}: mc_samples must be an integer >= 1, got {mc_samples!r}")
    batches = _as_batches(batches)
    if not batches:
        raise ValueError(f"{where}: no batches to fit the curvature on")
    model = _unwrap(model)
    names = covered_modules(model, modules)
    by_name = dict(model.named_modules())
    module_of = {n: by_name[n] for n in names}
    param_name = {id(p): n for n, p in model.named_parameters()}
    blocks: dict[str, _Block] = {}
    for n, m in module_of.items():
        dtype = torch.promote_types(m.weight.dtype, torch.float32)
        bias = m.bias if getattr(m, "bias", None) is not None and m.bias.requires_grad else None
        transposed = _is_conv1d(m)
        out_dim, in_dim = (m.weight.shape[1], m.weight.shape[0]) if transposed else m.weight.shape
        in_dim += bias is not None
        blocks[n] = _Block(weight=param_name[id(m.weight)], bias=param_name[id(bias)] if bias is not None else None,
                           transposed=transposed, A=torch.zeros(in_dim, in_dim, dtype=dtype, device=m.weight.device),
                           G=torch.zeros(out_dim, out_dim, dtype=dtype, device=m.weight.device))
    in_blocks = {n for b in blocks.values() for n in (b.weight, b.bias) if n is not None}
    diag_named = [(n, p) for n, p in _trainable(model) if n not in in_blocks]
    if not blocks and not diag_named:
        raise ValueError(f"{where}: the model has no trainable parameters")
    device = next(model.parameters()).device
    rank = dist.get_rank() if is_distributed() else 0
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(seed) + rank)
    if is_distributed() and fisher != "exact" and diag_named:
        # the diagonal's per-batch all-reduce is a collective: every process must make the same number
        counts = torch.tensor([len(batches), -len(batches)], device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if int(counts[0]) != -int(counts[1]):
            raise ValueError(f"{where}: every process must pass the same number of batches with fisher={fisher!r} "
                             f"(they pass between {-int(counts[1])} and {int(counts[0])})")

    draws = mc_samples if fisher == "mc" else 1
    diag_dtype = {n: torch.promote_types(p.dtype, torch.float32) for n, p in diag_named}
    diag_sum = {n: torch.zeros_like(p, dtype=diag_dtype[n]) for n, p in diag_named}
    rows_a = {n: 0 for n in blocks}
    tokens = 0
    was_training = model.training
    model.eval()  # no dropout: the curvature of the deterministic model
    try:
        # Pass 1: A, G and the diagonal.
        for logits, cap, loss_pos, _, units in _passes(model, batches, module_of, fisher, mc_samples, generator,
                                                       device):
            tokens += int(loss_pos.sum())
            feats = {n: [(_augment(blocks[n], a, loss_pos.shape), out) for a, out in cap.calls[n]] for n in blocks}
            for n, calls in feats.items():
                for a, _ in calls:
                    sel = a[loss_pos]
                    blocks[n].A.addmm_(sel.t(), sel)
                    rows_a[n] += sel.shape[0]
            outs = [out for calls in feats.values() for _, out in calls]
            for grad_logits, _ in units:
                grads = torch.autograd.grad(logits, outs + [p for _, p in diag_named], grad_logits,
                                            retain_graph=True, allow_unused=True)
                k = 0
                for n, calls in feats.items():
                    for _ in calls:
                        g = grads[k]
                        k += 1
                        if g is not None:
                            sel = g.to(blocks[n].G.dtype)[loss_pos]
                            blocks[n].G.addmm_(sel.t(), sel)
                diag_grads = [torch.zeros_like(diag_sum[n]) if g is None else g.to(diag_sum[n].dtype)
                              for (n, _), g in zip(diag_named, grads[k:])]
                if fisher != "exact" and is_distributed() and diag_grads:
                    # the gradient of the global batch's summed loss, squared after the sum (GNB)
                    flat = all_reduce_sum(torch.cat([g.flatten() for g in diag_grads]))
                    diag_grads = list(flat.split([g.numel() for g in diag_grads]))
                for (n, _), g in zip(diag_named, diag_grads):
                    diag_sum[n].addcmul_(g.view_as(diag_sum[n]), g.view_as(diag_sum[n]))
            del logits, cap, feats, outs
        reduce_names = list(blocks)
        total = all_reduce_sum(torch.tensor([float(tokens)] + [float(rows_a[n]) for n in reduce_names],
                                            dtype=torch.float64, device=device))
        tokens = int(total[0])
        if tokens == 0:
            raise ValueError(f"{where}: the batches have no loss-bearing tokens (all labels are -100)")
        for i, n in enumerate(reduce_names):
            b = blocks[n]
            all_reduce_sum(b.A).div_(max(float(total[i + 1]), 1.0))
            all_reduce_sum(b.G).div_(tokens * draws)
            b.eig()
        for h in diag_sum.values():
            if fisher == "exact":
                all_reduce_sum(h)  # summed locally per (token, class): add the processes' sums
            h.div_(tokens * draws)
        if kind == "ekfac":
            _fit_corrections(model, batches, blocks, module_of, fisher, mc_samples, generator, device, tokens * draws)
    finally:
        model.train(was_training)
    return KroneckerCurvature(model, kind=kind, fisher=fisher, mc_samples=mc_samples, tokens=tokens,
                              blocks=blocks, diag=diag_sum)


def _augment(block: _Block, a: torch.Tensor, positions: torch.Size) -> torch.Tensor:
    if a.shape[:-1] != positions:
        raise ValueError(f"fit_kfac: the input of the module owning {block.weight!r} has shape {tuple(a.shape)}; "
                         f"expected (batch, sequence, features) = ({positions[0]}, {positions[1]}, ...)")
    a = a.to(block.A.dtype)
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if block.bias else a


def _passes(model: torch.nn.Module, batches: Sequence[Batch], module_of: dict[str, torch.nn.Module], fisher: str,
            mc_samples: int, generator: torch.Generator | None, device: torch.device) -> Iterable[tuple]:
    """For each batch: one forward with the hooks on, then the gradients of the logits to back-propagate.

    Yields (logits, capture, loss positions (N, T), real positions (N, T), units), ``units`` an
    iterator of (dL^/dlogits, example row or None)."""
    for batch in batches:
        ids = batch["input_ids"].to(device)
        attention = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        with _Capture(module_of) as cap, torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits
        mask = labels[:, 1:] != IGNORE_INDEX  # (N, T-1): position t predicts labels[t + 1]
        loss_pos = torch.zeros_like(attention, dtype=torch.bool)
        loss_pos[:, :-1] = mask
        real_pos = attention.bool()
        selected = upcast(logits[:, :-1, :][mask]).detach()
        probs = torch.softmax(selected, dim=-1)
        rows = mask.nonzero()[:, 0]

        def units(probs: torch.Tensor = probs, mask: torch.Tensor = mask, logits: torch.Tensor = logits,
                  labels: torch.Tensor = labels, rows: torch.Tensor = rows) -> Iterable[tuple[torch.Tensor, int | None]]:
            for gz, row in _draw_units(fisher, probs, labels[:, 1:][mask], rows, mc_samples, generator):
                grad_logits = torch.zeros_like(logits)
                grad_logits[:, :-1][mask] = gz.to(logits.dtype)
                yield grad_logits, row

        yield logits, cap, loss_pos, real_pos, units()


def _fit_corrections(model: torch.nn.Module, batches: Sequence[Batch], blocks: dict[str, _Block],
                     module_of: dict[str, torch.nn.Module], fisher: str, mc_samples: int,
                     generator: torch.Generator | None, device: torch.device, normaliser: int) -> None:
    """EK-FAC pass 2: S = (1/(B·draws)) Σ_e (Q_G^T D_e Q_A)^2 with per-example gradients D_e (module docstring)."""
    sums = {n: torch.zeros_like(b.G[:, :1] * b.A[:1, :]) for n, b in blocks.items()}
    for logits, cap, loss_pos, real_pos, units in _passes(model, batches, module_of, fisher, mc_samples,
                                                            generator, device):
        feats = {n: [(_augment(blocks[n], a, loss_pos.shape) @ blocks[n].QA, out) for a, out in cap.calls[n]]
                 for n in blocks}
        outs = [out for calls in feats.values() for _, out in calls]
        if not outs:
            continue
        keep = real_pos.unsqueeze(-1)
        for grad_logits, row in units:
            grads = torch.autograd.grad(logits, outs, grad_logits, retain_graph=True, allow_unused=True)
            k = 0
            for n, calls in feats.items():
                b = blocks[n]
                per_example = None
                for proj_a, _ in calls:
                    g = grads[k]
                    k += 1
                    if g is None:
                        continue
                    proj_g = (g.to(b.G.dtype) * keep) @ b.QG  # (N, T, o); padding positions dropped
                    if row is None:  # one example per sequence
                        d = torch.einsum("nto,nti->noi", proj_g, proj_a)
                    else:  # one example: this (token, class) pair, whose gradient lives in its row
                        d = (proj_g[row].t() @ proj_a[row]).unsqueeze(0)
                    per_example = d if per_example is None else per_example + d
                if per_example is not None:
                    sums[n].add_((per_example**2).sum(0))
        del logits, cap, feats, outs
    for n, b in blocks.items():
        b.S = all_reduce_sum(sums[n]).div_(normaliser)
