"""Hooks that capture every covered layer's inputs and output gradients during any forward+backward."""

from __future__ import annotations

import collections
import dataclasses
import functools
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from diffin_lightning.dots.factors import LayerFactors
from diffin_lightning.dots.per_sample_dots import DEFAULT_MAX_MATERIALISED_ELEMENTS, PerSampleDots
from diffin_lightning.dots.registry import LayerRule, rule_for
from diffin_lightning.dots.stream import ProductStream, StreamedProducts


def _accumulated(reference: weakref.ReferenceType[LayerCapture], name: str, parameter: Tensor) -> None:
    capture = reference()
    if capture is not None:
        capture._on_accumulated(name, parameter)


class _Probe(torch.autograd.Function):
    """The identity on a layer's output, with a 0-d input whose gradient asks the backward to reach the layer.

    A products-only backward (``torch.autograd.grad(loss, probes)``) must fire every covered
    layer's output hook without computing its weight gradient. Asking for the outputs' own
    gradients would do that, but autograd would hold every one of them until the backward ends
    (a copy of the activations: the memory the stream lets go). A probe's gradient is one zero.
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, probe: Tensor) -> Tensor:  # type: ignore[override]
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return gradient, gradient.new_zeros(())


@dataclass
class _Call:
    """One call of a covered module: what its rule kept, and its outputs' gradients once backward ran.

    An eager rule's call (:attr:`LayerRule.eager`) holds its factors instead, formed from its
    unscaled output gradient as that arrives; its inputs and gradient are let go there. A
    streamed call (its pass has a :class:`ProductStream`) holds nothing: its products went
    into the pass's :attr:`_Pass.streamed` as its gradient arrived.
    """

    module_name: str
    activations: Any
    backprops: list[Tensor | None]
    eager: _Covered | None = None
    eager_factors: list[LayerFactors] = field(default_factory=list)
    entry: _Covered | None = None
    streamed: bool = False
    size: int = 0  # elements of its (first) output
    inner: int = 0  # of its gradients, how many come from nodes inside the call (the last ones)
    deferred: list[LayerFactors] | None = None  # taken once these parameters' .grad has accumulated
    waiting: set[str] = field(default_factory=set)


@dataclass
class _Pass:
    """The calls of one forward (one micro-batch); closed once any of its gradients arrived."""

    calls: list[_Call] = field(default_factory=list)
    received: bool = False
    batch_size: int | None = None
    stream: ProductStream | None = None
    streamed: StreamedProducts | None = None
    calls_per_module: collections.Counter[str] = field(default_factory=collections.Counter)
    waiting: dict[str, _Call] = field(default_factory=dict)  # parameter name -> the deferred call that reads its .grad


@dataclass
class _Covered:
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # local parameter name -> global name, covered parameters only
    parameters: tuple[Tensor, ...] = ()  # the covered parameters themselves (see dtype)

    @property
    def dtype(self) -> torch.dtype | None:
        """The covered parameters' dtype (``None`` where they differ): what the rules read every captured tensor in.

        Under autocast a layer's input and output gradient are in half precision (bfloat16) beside
        float32 parameters and directions. Read at each call, not when the capture was planned:
        Lightning converts the module's precision (``64-true``) after the callbacks' ``setup``.
        """
        dtypes = {parameter.dtype for parameter in self.parameters}
        return dtypes.pop() if len(dtypes) == 1 else None


def _in_dtype(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` (a tensor, or tuples, lists and dicts of them) with its floating tensors in ``dtype`` (copies only where they differ)."""
    if dtype is None:
        return value
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (tuple, list)):
        return type(value)(_in_dtype(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _in_dtype(item, dtype) for key, item in value.items()}
    return value


def _read_in_dtype(entry: _Covered, activations: Any, backprops: Sequence[Tensor | None]) -> tuple[Any, list[Tensor | None]]:
    """A call's captured inputs and output gradients, read in its parameters' dtype where it ran under autocast.

    (Its output gradient's dtype says whether it did: only then is the walk through the inputs taken.)
    """
    dtype = entry.dtype
    if dtype is None or all(b is None or b.dtype == dtype for b in backprops):
        return activations, list(backprops)
    return _in_dtype(activations, dtype), [_in_dtype(b, dtype) for b in backprops]


def _rule_factors(entry: _Covered, module_name: str, activations: Any, backprops: Sequence[Tensor | None]) -> list[LayerFactors]:
    """The entry's rule's factors of one call, its captured tensors read in the parameters' dtype."""
    activations, backprops = _read_in_dtype(entry, activations, backprops)
    return entry.rule.factors(entry.module, module_name, activations, backprops, entry.names)


class LayerCapture:
    """Captures per-sample gradient factors of every covered layer of ``module``.

    On construction, forward hooks go on every module whose exact type has a rule in the
    registry and that owns at least one requested parameter. While :attr:`enabled` (inside
    :meth:`recording`) and autograd is on, each call keeps what its rule needs (detached
    inputs) and registers tensor hooks on its outputs that keep the output gradients. Nothing
    is kept while disabled.

    A parameter is *covered* when every module that owns it has a rule claiming it (a weight
    tied between an Embedding and a Linear is covered; one also owned by a module without a
    rule is not). A parameter used outside its module's ``forward`` (for example
    ``F.linear(x, self.layer.weight)`` in a parent) cannot be seen by any hook: keep such
    parameters out of ``parameter_names`` or out of ruled modules.

    Micro-batches: a forward call that comes after any gradient of the current pass arrived
    opens a new pass (gradient accumulation: forward, backward, forward, backward). Calls of
    one module within a pass (weight sharing) add up. The sample axis is dim 0 of every
    covered layer's input (batch-first models); the passes' samples concatenate in order.
    A call whose input and output have size 1 on the sample axis while the pass already holds
    B samples (a table shared by the batch, such as GPT-2's position embedding looked up with
    ids ``[1, T]``) has its output expanded to B (a view: no value downstream changes) so that
    its gradient arrives per sample.
    Activation checkpointing (forwards re-run during backward) is not supported.

    Args:
        module: the model (a LightningModule or any ``nn.Module``).
        parameter_names: the trainable parameters to cover (names from
            ``module.named_parameters()``); default every parameter with ``requires_grad``.
        max_materialised_elements: passed to :class:`PerSampleDots` (cost model memory cap).
    """

    def __init__(
        self,
        module: nn.Module,
        parameter_names: Iterable[str] | None = None,
        max_materialised_elements: int = DEFAULT_MAX_MATERIALISED_ELEMENTS,
    ) -> None:
        self.module = module
        self.max_materialised_elements = max_materialised_elements
        parameters = dict(module.named_parameters())
        if parameter_names is None:
            requested = [name for name, value in parameters.items() if value.requires_grad]
        else:
            requested = list(parameter_names)
            unknown = [name for name in requested if name not in parameters]
            if unknown:
                raise ValueError(
                    f"`parameter_names` must name parameters of the module (as `named_parameters()` spells them); got unknown {unknown[:5]}. "
                    f"Fix: pass names from `[n for n, p in module.named_parameters() if p.requires_grad]`."
                )
        self.enabled = False
        self.keep_outputs = False  # keep the hooked outputs for take_outputs (products-only passes)
        self.stream: ProductStream | None = None  # see stream_products
        self._outputs: list[Tensor] = []
        self._passes: list[_Pass] = []
        self._handles: list[RemovableHandle] = []
        self._covered: dict[str, _Covered] = {}
        self.uncovered_reasons: dict[str, str] = {}
        self._plan(module, parameters, requested)
        self._parameters = parameters
        for module_name, entry in self._covered.items():
            hook = functools.partial(self._on_forward, module_name)
            self._handles.append(entry.module.register_forward_hook(hook, with_kwargs=True))
        # Deferred calls of a stream are taken when their parameters' .grad has accumulated. Through a weak
        # reference: the parameters outlive a capture that was dropped without remove().
        reference = weakref.ref(self)
        for name in self.covered_parameter_names:
            hook = functools.partial(_accumulated, reference, name)
            self._handles.append(parameters[name].register_post_accumulate_grad_hook(hook))

    def _plan(self, module: nn.Module, parameters: dict[str, nn.Parameter], requested: list[str]) -> None:
        name_of = {id(value): name for name, value in parameters.items()}
        owners: dict[int, list[nn.Module]] = {}
        for _, child in module.named_modules():
            for value in child._parameters.values():
                if value is not None:
                    owners.setdefault(id(value), []).append(child)
        claimed: set[tuple[int, int]] = set()  # (parameter id, owner module id) pairs a rule answers for
        claimed_owners: set[int] = set()  # submodules whose parameters an ancestor's rule handles
        claims: dict[str, tuple[nn.Module, LayerRule, list[tuple[str, int]]]] = {}
        reasons: dict[int, str] = {}
        for module_name, child in module.named_modules():
            if id(child) in claimed_owners:
                continue
            rule = rule_for(child)
            if rule is None:
                continue
            reason = rule.unsupported_reason(child)
            if reason is not None:
                for value in child.parameters():
                    reasons[id(value)] = f"{module_name} ({type(child).__name__}): {reason}"
                continue
            entries = []
            for local in rule.parameter_names(child):
                value = child.get_parameter(local)
                owner = child.get_submodule(local.rpartition(".")[0]) if "." in local else child
                claimed.add((id(value), id(owner)))
                if owner is not child:
                    claimed_owners.add(id(owner))
                entries.append((local, id(value)))
            claims[module_name] = (child, rule, entries)
        covered: set[str] = set()
        missing_holders: dict[str, list[nn.Module]] = {}
        for name in requested:
            value = parameters[name]
            if not value.requires_grad:
                raise ValueError(
                    f"`parameter_names` must name trainable parameters (requires_grad=True); {name!r} is frozen. "
                    "Fix: leave it out (a frozen parameter is a constant)."
                )
            holders = owners.get(id(value), [])
            missing = [holder for holder in holders if (id(value), id(holder)) not in claimed]
            if holders and not missing:
                covered.add(name)
            elif id(value) in reasons:
                self.uncovered_reasons[name] = reasons[id(value)]
            else:
                missing_holders[name] = missing
        # The rest: each module that owns the parameter and answers for it with no rule, named by its path in
        # the model. (The supported layers are listed once, by whoever reports these: StepCapture.fallback_message.)
        uncovered_ids = {id(parameters[name]) for name in requested if name not in covered}
        paths = {id(child): child_name for child_name, child in module.named_modules()}
        for name, missing in missing_holders.items():
            parts = []
            for holder in missing:
                kind = type(holder).__name__
                label = f"{paths[id(holder)]} ({kind})" if paths.get(id(holder)) else f"the model itself ({kind})"
                # Its parameters that go through the fallback, by their names in the module (bias_k and bias_v together).
                local = [key for key, other in holder._parameters.items() if other is not None and id(other) in uncovered_ids]
                goes = f"{' and '.join(local)} {'goes' if len(local) == 1 else 'go'} through the fallback"
                rule = rule_for(holder)
                if rule is not None and paths.get(id(holder)) in claims:
                    # A covered type whose rule does not answer for this parameter (attention's bias_k with add_bias_kv).
                    parts.append(f"{label}: {kind}'s rule covers {rule.coverage(holder)}; {goes}")
                else:
                    parts.append(f"{label} has no rule; {goes}")
            self.uncovered_reasons[name] = "; ".join(parts)
        for module_name, (child, rule, entries) in claims.items():
            names = {local: name_of[identity] for local, identity in entries if name_of.get(identity) in covered}
            if names:
                self._covered[module_name] = _Covered(child, rule, names, tuple(child.get_parameter(local) for local in names))
        self.covered_parameter_names: tuple[str, ...] = tuple(name for name in requested if name in covered)
        # Modules with a parameter that another covered module also uses (tied weights): their products
        # have cross terms with the other module's, so they are never taken alone during a backward.
        users: dict[str, list[str]] = {}
        for module_name, entry in self._covered.items():
            for name in entry.names.values():
                users.setdefault(name, []).append(module_name)
        self._shared_modules = frozenset(m for names in users.values() if len(names) > 1 for m in names)
        self.uncovered_parameter_names: tuple[str, ...] = tuple(name for name in requested if name not in covered)

    @property
    def covered_module_names(self) -> tuple[str, ...]:
        """Qualified names of the modules that carry hooks."""
        return tuple(self._covered)

    def _on_forward(self, module_name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not self.enabled or not torch.is_grad_enabled():
            return None
        entry = self._covered[module_name]
        targets = entry.rule.outputs(output)
        if not any(isinstance(target, Tensor) and target.requires_grad for target in targets):
            return None
        if not self._passes or self._passes[-1].received:
            self._passes.append(_Pass(stream=self.stream))
        current = self._passes[-1]
        replaced = None
        if (
            isinstance(output, Tensor)
            and output.dim() > 0
            and output.shape[0] == 1
            and current.batch_size not in (None, 1)
            and args
            and isinstance(args[0], Tensor)
            and args[0].dim() > 0
            and args[0].shape[0] == 1
        ):
            # A call shared by the whole batch (GPT-2's position table looked up with ids [1, T]):
            # its output is broadcast downstream, so its gradient arrives summed over samples.
            # Expanding it to the batch first changes no value downstream and gives the hook
            # each sample's gradient.
            size = int(current.batch_size)  # type: ignore[arg-type]
            replaced = output.expand(size, *output.shape[1:])
            args = (args[0].expand(size, *args[0].shape[1:]), *args[1:])
            targets = entry.rule.outputs(replaced)
        if current.batch_size is None and isinstance(targets[0], Tensor) and targets[0].dim() > 0:
            current.batch_size = int(targets[0].shape[0])
        call = _Call(module_name, entry.rule.activations(module, args, kwargs), [None] * len(targets), entry if entry.rule.eager else None, entry=entry)
        nodes = entry.rule.inner_gradients(module, call.activations, output if replaced is None else replaced)
        call.backprops += [None] * len(nodes)
        call.inner = len(nodes)
        current.calls.append(call)
        current.calls_per_module[module_name] += 1
        call.size = int(targets[0].numel()) if isinstance(targets[0], Tensor) else 0
        base = output if replaced is None else replaced
        probe_it = self.keep_outputs and isinstance(base, Tensor) and len(targets) == 1 and targets[0] is base
        if probe_it:
            # The hook goes on the probe's output, the tensor the rest of the model reads: a backward that asks
            # for the probe computes that tensor's gradient, but prunes the layer's own node below it (and
            # with it any hook on the layer's output) when nothing below is asked for.
            probe = torch.zeros((), dtype=base.dtype, device=base.device, requires_grad=True)
            replaced = _Probe.apply(base, probe)
            targets = [replaced]
            self._outputs.append(probe)
        for index, target in enumerate(targets):
            if isinstance(target, Tensor) and target.requires_grad:
                target.register_hook(functools.partial(self._on_backward, current, call, index))
                if self.keep_outputs and not probe_it:
                    self._outputs.append(target)
        for index, node in enumerate(nodes, start=len(targets)):
            node.register_prehook(functools.partial(self._on_node_backward, current, call, index))
        return replaced

    def stream_products(self, stream: ProductStream | None) -> None:
        """Take the products ``stream`` asks for during the coming backward(s), each layer as its gradient arrives.

        Applies to the passes that start from now until :meth:`clear`. Which calls may be taken
        alone is :meth:`_takeable`'s rule; :meth:`ProductStream.decision` says whether one is
        taken when its gradient arrives, once its parameters' ``.grad`` has accumulated, or held.
        A taken call's inputs and output gradient are let go there; other calls are held as
        without a stream. :meth:`per_sample` then answers only the products the stream took (for
        the taken layers) and adds them to the held layers'. A second gradient reaching a taken
        call (a backward through the same graph twice) raises.
        """
        self.stream = None if stream is None else dataclasses.replace(stream, shared_modules=self._shared_modules)

    @property
    def keeps_whole_outputs(self) -> bool:
        """Whether a pass that keeps the layers' outputs (:meth:`take_outputs`) keeps some whole, not as 0-d probes.

        A rule whose call has several outputs (attention's) hands them to the backward as
        themselves, so such a pass holds their gradients to its end.
        """
        return any(type(entry.rule).outputs is not LayerRule.outputs for entry in self._covered.values())

    def held_parameter_names(self) -> set[str]:
        """After a forward with a stream on: the covered parameters of the calls it cannot take (see :meth:`_takeable`).

        Their products need ``G_sum`` from autograd; every other covered layer's can come from its
        captures alone (eager layers hold their own factors).
        """
        stream = self.stream
        assert stream is not None, "held_parameter_names needs a stream"
        held: set[str] = set()
        for current in self._passes:
            for call in current.calls:
                if call.eager is None and call.entry is not None and not LayerCapture._takeable(current, call, stream):
                    held.update(call.entry.names.values())
        return held

    @staticmethod
    def _takeable(current: _Pass, call: _Call, stream: ProductStream) -> bool:
        """Whether ``stream`` may take this (non-eager) call alone, before the backward ends.

        Not when its products have cross terms with another call's (its module called twice in
        the pass, or sharing a parameter with another covered module), when its outputs give
        several gradients none of which is known to come last (a call with nodes inside it gets
        theirs last), or when it is too small to be worth the per-layer Python calls.
        """
        return (
            call.entry is not None
            and (len(call.backprops) == 1 or call.inner > 0)
            and current.calls_per_module[call.module_name] == 1
            and call.module_name not in stream.shared_modules
            and call.size >= stream.min_elements
        )

    def take_outputs(self) -> list[Tensor]:
        """The hooked outputs kept since the last call (with :attr:`keep_outputs` on), handed over once.

        A single-tensor output is kept as a 0-d probe (see :class:`_Probe`; the module returns it
        through the probe's identity), other outputs as themselves.
        ``torch.autograd.grad(loss, take_outputs())`` fires every hook with its layer's output
        gradient while computing no parameter gradient at all (autograd skips the weight
        products no requested input needs): products only, at about half the backward's cost.
        The list lives on the capture, not on a pass: a pass is reachable from the outputs'
        hooks, and a reference back from it would close a cycle that keeps every step's
        captures alive until the garbage collector runs (+200 MB on the MLP benchmark).
        """
        outputs, self._outputs = self._outputs, []
        return outputs

    # How many captured output gradients, over every LayerCapture alive, hold each storage (by address):
    # autograd hands the same gradient to every capture hooked on a layer (two callbacks on one model),
    # and per_sample(in_place=True) may scale a gradient's memory only where nothing else holds it.
    _holders: collections.Counter[int] = collections.Counter()

    @staticmethod
    def _on_backward(current: _Pass, call: _Call, index: int, gradient: Tensor) -> None:
        gradient = gradient.detach()
        if call.eager is not None:
            if call.activations is None:
                raise RuntimeError(
                    f"LayerCapture: a second gradient reached {call.module_name} ({type(call.eager.module).__name__}) in one captured pass, "
                    "after its per-sample gradients were formed from the first; a backward through the same graph twice "
                    "(retain_graph=True) is not supported while capturing. Fix: one backward per forward in the recorded step."
                )
            backprops: list[Tensor | None] = [None] * len(call.backprops)
            backprops[index] = gradient
            entry = call.eager
            call.eager_factors += _rule_factors(entry, call.module_name, call.activations, backprops)
            call.activations = None  # the layer's input and output gradient go now, not at the end of the step
            current.received = True
            return
        if call.streamed:
            raise RuntimeError(
                f"LayerCapture: a second gradient reached {call.module_name} after its products were taken during the backward "
                "(a ProductStream) and its captures let go; a backward through the same graph twice (retain_graph=True) "
                "cannot be streamed. Fix: one backward per forward in a recorded step, or DiffInCallback(stream_products=False)."
            )
        previous = call.backprops[index]
        if previous is None and len(call.backprops) == 1 and LayerCapture._take(current, call, [gradient]):
            current.received = True
            return
        stored = gradient if previous is None else previous + gradient
        if previous is not None:
            LayerCapture._release(previous)
        LayerCapture._holders[stored.untyped_storage().data_ptr()] += 1
        call.backprops[index] = stored
        current.received = True
        if previous is None and call.inner and index == len(call.backprops) - 1:
            # The last node inside the call lies upstream of all its outputs: every gradient the call will
            # get has arrived (attention: its output's, its weights', the in-projection's).
            if LayerCapture._take(current, call, list(call.backprops)):
                LayerCapture._release_backprops(call)

    @staticmethod
    def _take(current: _Pass, call: _Call, backprops: list[Tensor | None]) -> bool:
        """Take the call's products (from all of its gradients) into its pass's stream now, if it can be taken alone; whether it was."""
        stream, entry = current.stream, call.entry
        if stream is None or entry is None or not LayerCapture._takeable(current, call, stream):
            return False
        blocks = _rule_factors(entry, call.module_name, call.activations, backprops)
        names = tuple(entry.names.values())
        decision = stream.decision(blocks, names) if blocks else "hold"
        if decision == "hold":
            return False
        call.activations = None  # the call's own references go now (a deferred call's factors hold its tensors a moment longer)
        call.streamed = True
        if decision == "defer":
            # Its products read G_sum, which autograd accumulates into .grad right after this layer's backward
            # node runs: taken there (post-accumulate-grad hooks), when the last of its parameters has arrived.
            call.deferred = list(blocks)
            call.waiting = {name for block in blocks for name in block.slices}
            for name in call.waiting:
                current.waiting[name] = call
            return True
        LayerCapture._add(current, stream.take(blocks, names))
        return True

    @staticmethod
    def _add(current: _Pass, taken: StreamedProducts) -> None:
        if current.streamed is None:
            current.streamed = taken
        else:
            current.streamed.add(taken)

    def _on_accumulated(self, name: str, parameter: Tensor) -> None:
        current = self._passes[-1] if self._passes else None
        call = None if current is None else current.waiting.pop(name, None)
        if call is None:
            return
        call.waiting.discard(name)
        if not call.waiting:
            self._finish(current, call)  # type: ignore[arg-type]

    def _finish(self, current: _Pass, call: _Call) -> None:
        """A deferred call's products, with its parameters' ``.grad`` as ``G_sum`` (zeros for one autograd never reached)."""
        assert call.deferred is not None and current.stream is not None and call.entry is not None
        parameters = self._parameters
        gradient = {}
        for block in call.deferred:
            for name in block.slices:
                grad = parameters[name].grad
                gradient[name] = grad if grad is not None else torch.zeros_like(parameters[name])
        LayerCapture._add(current, current.stream.take(call.deferred, tuple(call.entry.names.values()), gradient))
        for name in call.waiting:
            current.waiting.pop(name, None)
        call.deferred, call.waiting = None, set()

    @staticmethod
    def _on_node_backward(current: _Pass, call: _Call, index: int, grad_outputs: tuple[Tensor | None, ...]) -> None:
        if grad_outputs and grad_outputs[0] is not None:
            LayerCapture._on_backward(current, call, index, grad_outputs[0])

    @staticmethod
    def _release_backprops(call: _Call) -> None:
        """Let go of the call's stored output gradients (their holder counts drop; the call keeps none)."""
        for index, backprop in enumerate(call.backprops):
            if backprop is not None:
                LayerCapture._release(backprop)
            call.backprops[index] = None

    @staticmethod
    def _release(tensor: Tensor) -> None:
        address = tensor.untyped_storage().data_ptr()
        LayerCapture._holders[address] -= 1
        if LayerCapture._holders[address] <= 0:
            del LayerCapture._holders[address]

    @contextmanager
    def recording(self) -> Iterator[LayerCapture]:
        """Enable capture for the forward and backward passes of one optimizer step (clears the last one)."""
        self.clear()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    def clear(self) -> None:
        """Forget every captured call (frees the activations)."""
        for current in self._passes:
            for call in current.calls:
                LayerCapture._release_backprops(call)
        self._passes = []
        self._outputs = []
        self.stream = None

    def remove(self) -> None:
        """Remove every hook (the capture is inert afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.enabled = False
        self.clear()

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def per_sample(self, backprop_scale: float | Tensor | Sequence[float | Tensor] = 1.0, in_place: bool = False) -> PerSampleDots:
        """Per-sample products over the captured step.

        Call it before the optimizer changes the parameters (attention's rule, where it cannot
        read its projections from the call's graph, recomputes its core from the inputs it kept
        and a copy of its projections; the other rules use only captured tensors).

        Args:
            backprop_scale: multiplies every captured output gradient so the rules see
                gradients of the SUM of per-sample losses: ``B`` for a mean loss, ``k * B``
                under accumulation over k micro-batches of a mean divided by k, ``1 / scale``
                under AMP's loss scaling (a float or a 0-d tensor, kept on the device); or one
                such factor per captured micro-batch (in order) when they differ, for example a
                smaller last micro-batch under a mean loss.
            in_place: scale the captured output gradients themselves instead of copies (one copy of
                every output gradient less at the peak); the capture must then not be read again
                (clear it). A gradient whose memory another captured one shares, or that is not
                contiguous, is still copied.
        """
        received = [current for current in self._passes if current.received]  # a forward no backward reached has nothing to attribute
        for current in received:
            # Deferred calls whose parameters' .grad never arrived (not reached by autograd): taken now.
            for call in {id(call): call for call in current.waiting.values()}.values():
                self._finish(current, call)
        if isinstance(backprop_scale, (list, tuple)):
            if len(backprop_scale) != len(received):
                raise ValueError(
                    f"`backprop_scale` must be one factor, or one per captured micro-batch ({len(received)}); got {len(backprop_scale)} factors. "
                    "Fix: pass a single factor when every micro-batch has the same scale."
                )
            scales = list(backprop_scale)
        else:
            scales = [backprop_scale] * len(received)
        passes, sizes, streamed_parts = [], [], []
        for current, scale in zip(received, scales):
            by_key: dict[Any, list] = {}
            # (A scale of exactly 1, as in every extra pass, copies nothing: a copy of every output gradient.)
            unscaled = isinstance(scale, (int, float)) and scale == 1
            # In place only where this capture's one reference is the only one: autograd hands one gradient
            # to several layers where outputs are added (a residual), and to every capture hooked on a
            # layer; a parameter's .grad is never scaled, should autograd have handed it one of these.
            grads = {p.grad.untyped_storage().data_ptr() for p in self.module.parameters() if p.grad is not None} if in_place else set()

            def scaled(b: Tensor, scale: float | Tensor = scale) -> Tensor:
                address = b.untyped_storage().data_ptr()
                if in_place and b.is_contiguous() and LayerCapture._holders[address] == 1 and address not in grads:
                    return b.mul_(scale)
                return b * scale

            for call in current.calls:
                if call.eager is not None:
                    for factors in call.eager_factors:
                        by_key.setdefault(factors.key, []).append(factors if unscaled else factors.scaled(scale))
                    continue
                if all(backprop is None for backprop in call.backprops):
                    continue
                entry = self._covered[call.module_name]
                # Under autocast read in the parameters' dtype first, then scaled in that copy of our own (one rounding, not two).
                activations, read = _read_in_dtype(entry, call.activations, call.backprops)
                backprops = [
                    None if b is None else b if unscaled else b.mul_(scale) if b is not captured else scaled(b)
                    for b, captured in zip(read, call.backprops)
                ]
                for factors in entry.rule.factors(entry.module, call.module_name, activations, backprops, entry.names):
                    by_key.setdefault(factors.key, []).append(factors)
            blocks = [items[0].merge(items[1:]) if len(items) > 1 else items[0] for items in by_key.values()]
            streamed = current.streamed
            if streamed is not None and not unscaled:
                streamed = streamed.scaled(scale)
            if not blocks and streamed is None:
                continue
            batch_sizes: dict[Any, int] = {block.key: block.batch_size for block in blocks}
            if streamed is not None:
                batch_sizes["(layers taken during the backward)"] = streamed.batch_size
            if len(set(batch_sizes.values())) != 1:
                raise ValueError(
                    "LayerCapture: every covered layer must see the samples on dim 0 (batch-first) with one batch size per forward; "
                    f"got sizes {batch_sizes}. Fix: use batch_first layouts, or leave the odd layers' parameters out of `parameter_names`."
                )
            passes.append(blocks)
            sizes.append(next(iter(batch_sizes.values())))
            streamed_parts.append(streamed)
        return PerSampleDots(passes, sizes, self.covered_parameter_names, self.max_materialised_elements, streamed=streamed_parts)
