"""An algorithm's extra heads on a timm backbone's pooled features (ReMixMatch's rotation head, a balanced
classifier, IOMatch's outlier head): attached so the model's own forward reaches them, and what an export keeps of
them."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from distssl.config import ConfigError


def add_heads(model: torch.nn.Module, heads: dict[str, Union[int, Callable[[int], torch.nn.Module]]]
              ) -> torch.nn.Module:
    """Give a timm model an algorithm's extra heads on the pooled features (``name -> outputs``, a linear
    classifier: ReMixMatch's 4-way rotation head, a balanced classifier; or ``name -> factory(features)``, any
    module: IOMatch's projection and its two heads), reached through the model's own forward, so a DeepSpeed
    engine forwards them and reduces their gradients like any other weight: ``model(x, head=name)`` is that
    head's output, ``model(x, heads=(a, b))`` is ``(logits, {a: ..., b: ...})`` from one backbone pass, and
    ``model(x)`` is unchanged. Head ``name``'s weights sit under ``{name}_head.`` in the state dict, which the
    exports leave out (:func:`without_aux_heads`)."""
    if not heads:
        return model
    if not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
        raise ConfigError(f"model {type(model).__name__} has no forward_features/forward_head: an extra head "
                          "needs the pooled features (every timm model has them)")
    for name, spec in heads.items():
        module = torch.nn.Linear(model.num_features, spec) if isinstance(spec, int) else spec(model.num_features)
        model.add_module(f"{name}_head", module)
    classify = model.forward

    def forward(x: torch.Tensor, head: str | None = None, heads: tuple[str, ...] = ()):
        if head is not None:
            return getattr(model, f"{head}_head")(model.forward_head(model.forward_features(x), pre_logits=True))
        if heads:
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)
            return model.get_classifier()(pooled), {h: getattr(model, f"{h}_head")(pooled) for h in heads}
        return classify(x)

    model.forward = forward
    return model


def with_head_as_classifier(state: dict, model: torch.nn.Module, head: str) -> dict:
    """``state`` with head ``head``'s weights in the timm classifier's place (a balanced head the run evaluates
    becomes the export's classifier); the head must be a linear layer of the classifier's shape."""
    out = dict(state)
    for name, param in classifier_params(model):
        source = f"{head}_head.{name.rsplit('.', 1)[-1]}"
        if source not in state or state[source].shape != param.shape:
            raise ValueError(f"head {head!r} has no {source} of the classifier's shape {tuple(param.shape)}")
        out[name] = state[source]
    return out


def export_state(state: dict, model: torch.nn.Module, heads, eval_head: Optional[str] = None, keep=()) -> dict:
    """The state an export holds: the timm model's, with ``eval_head`` as its classifier (a balanced head the
    run evaluated), and of the extra heads only those in ``keep`` (an outlier head distssl-predict reads)."""
    if eval_head:
        state = with_head_as_classifier(state, model, eval_head)
    return without_aux_heads(state, [h for h in heads if h not in keep])


def without_aux_heads(state: dict, heads) -> dict:
    """A state dict as the plain timm model has it (what an export holds): ``heads``' weights left out."""
    prefixes = tuple(f"{name}_head." for name in heads)
    return {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}


def classifier_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The timm classifier's parameters (``get_classifier()``), by name."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if head is None:
        return []
    ids = {id(p) for p in head.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]
