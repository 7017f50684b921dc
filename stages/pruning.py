"""Layer pruning: a student cut from a teacher by keeping some of its decoder layers, and the generic
(non-task) prompts whose teacher answers heal it.

The student is a fresh model built from the teacher's config with ``num_hidden_layers = len(keep)`` (and
per-layer settings such as ``layer_types`` cut the same way), into which the kept layers' weights are
copied under their new indices. Building it fresh keeps everything that depends on a layer's position
right for any architecture: each attention module's ``layer_idx`` (the KV cache slot), the layer count
in the config, and tied input/output embeddings (tied again by the new model, not copied twice).
"""

from __future__ import annotations

import copy
import re

import torch

LAYER_KEY = re.compile(r"^(?P<prefix>.*?\.layers)\.(?P<idx>\d+)\.(?P<rest>.+)$")


class PruneError(ValueError):
    pass


def every_nth(n_layers: int, n: int) -> list[int]:
    """Layers 0, n, 2n, ... and always the last one (it writes the representation the head reads)."""
    keep = list(range(0, n_layers, n))
    if keep[-1] != n_layers - 1:
        keep.append(n_layers - 1)
    return keep


def resolve_layers(spec, n_layers: int) -> list[int]:
    """``spec``: a list of layer indices (negative counts from the end) or ``{"every": n}``."""
    if isinstance(spec, dict):
        keep = every_nth(n_layers, int(spec["every"]))
    else:
        keep = [i + n_layers if i < 0 else i for i in spec]
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad or not keep:
        raise PruneError(f"layers {spec}: the model has layers 0..{n_layers - 1}")
    if sorted(set(keep)) != keep:
        raise PruneError(f"layers {spec}: list each layer once, in increasing order")
    return keep


def kept_layers(p, n_layers: int) -> list[int]:
    """The layers a ``prune`` config (``layers``, ``drop`` or ``every``) keeps of an ``n_layers``-layer teacher."""
    if p.layers is not None:
        return resolve_layers(p.layers, n_layers)
    if p.drop is not None:
        drop = {i + n_layers if i < 0 else i for i in p.drop}
        if not drop <= set(range(n_layers)):
            raise PruneError(f"prune.drop {p.drop}: the model has layers 0..{n_layers - 1}")
        keep = [i for i in range(n_layers) if i not in drop]
        if not keep:
            raise PruneError(f"prune.drop {p.drop}: removes all {n_layers} layers")
        return keep
    return every_nth(n_layers, p.every)


def cut_layers(model, keep: list[int]):
    """A new model of ``model``'s class with only the decoder layers ``keep`` (in that order)."""
    cfg = copy.deepcopy(model.config)
    n = cfg.num_hidden_layers
    keep = resolve_layers(keep, n)
    cfg.num_hidden_layers = len(keep)
    for key in ("layer_types", "mlp_only_layers", "sliding_window_layers"):
        per_layer = getattr(cfg, key, None)
        if isinstance(per_layer, list) and len(per_layer) == n:
            setattr(cfg, key, [per_layer[i] for i in keep])
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, t in model.state_dict().items():
        m = LAYER_KEY.match(name)
        if m is None:
            state[name] = t
        elif int(m["idx"]) in new_index:
            state[f"{m['prefix']}.{new_index[int(m['idx'])]}.{m['rest']}"] = t
    dtype = next(model.parameters()).dtype
    student = type(model)(cfg).to(dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = getattr(cfg, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise PruneError(f"pruned weights do not fit the cut config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        student.tie_weights()
    if model.generation_config is not None:
        student.generation_config = copy.deepcopy(model.generation_config)
    return student


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def same_outputs(a, b, ids: torch.Tensor) -> float:
    """Largest absolute logit difference of two models on ``ids`` (a check that a cut kept what it kept)."""
    return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


# Everyday requests with no arithmetic in them: the healing text is the teacher's own answers to these,
# so the pruned student relearns to speak (the chat format, stopping at the end of its turn) without
# ever seeing the task it will be trained and measured on.
GENERIC_PROMPTS = [
    "Write a short poem about the sea.",
    "Give me three tips for sleeping better.",
    "What is the capital of France?",
    "Explain what a rainbow is to a child.",
    "Describe your favourite season and why.",
    "How do I make a cup of tea?",
    "What are some good habits for studying?",
    "Tell me a short story about a cat who loves books.",
    "What does a librarian do?",
    "Suggest a name for a friendly robot.",
    "Why do leaves change colour in autumn?",
    "Write a polite email declining a meeting invitation.",
    "What is photosynthesis?",
    "Give me a recipe for a simple salad.",
    "How can I be more productive in the morning?",
    "Describe the city of Paris in two sentences.",
    "What is the difference between weather and climate?",
    "Write a haiku about winter.",
    "What should I pack for a weekend trip to the mountains?",
    "Explain why exercise is good for health.",
    "What is a noun? Give examples.",
    "Tell me about the history of the bicycle.",
    "How do bees make honey?",
    "Write a thank-you note to a teacher.",
    "What are the planets of the solar system?",
    "Give me advice for a job interview.",
    "What is the water cycle?",
    "Describe a sunset over the ocean.",
    "How do I care for a houseplant?",
    "What is the tallest mountain in the world?",
    "Write a limerick about a dog.",
    "Why is the sky blue?",
    "What are the benefits of reading?",
    "Explain what a computer program is.",
    "Suggest a fun activity for a rainy day.",
    "What do pandas eat?",
    "Write a short dialogue between two friends planning a picnic.",
    "How can I reduce stress?",
    "What is the meaning of the word 'curious'?",
    "Describe how a train works in simple words.",
    "What makes a good friend?",
    "Tell me a fun fact about octopuses.",
    "How do airplanes fly?",
    "Write a short motivational message.",
    "What is the difference between a frog and a toad?",
    "Give me tips for learning a new language.",
    "What is democracy?",
    "Describe the taste of chocolate.",
    "How are mountains formed?",
    "Write a short product description for a water bottle.",
    "What are some ways to save energy at home?",
    "Who was William Shakespeare?",
    "Explain what the internet is.",
    "What is your favourite book and why?",
    "How do I write a good paragraph?",
    "Give me ideas for a birthday party.",
    "What is the role of the heart in the body?",
    "Write a two-sentence horror story.",
    "What are clouds made of?",
    "Describe a busy market.",
    "How can I help protect the environment?",
    "What is a volcano?",
    "Write a short review of a movie you like.",
    "What does it mean to be kind?",
]
