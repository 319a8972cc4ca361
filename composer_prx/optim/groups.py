"""Which parameters Muon orthogonalises: the recipe's split of a model into Muon and Adam groups.

Recipe (PRX): every 2D weight inside the transformer blocks goes to Muon, the adaLN modulation included;
everything else -- biases, norms, embeddings, the patch/text input and final projections, the REPA
projector -- goes to Adam. `grouping="modulation_adam"` moves the adaLN modulation to Adam as well.
`ns_chunks` orthogonalises fused matrices blockwise: {"*.qkv.weight": 3} treats q, k and v apart.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence

from torch import nn

log = logging.getLogger(__name__)

GROUPINGS = ("recipe", "modulation_adam")
# Always Adam, although 2D and possibly inside the blocks: the REPA projector (a separate head).
ALWAYS_ADAM = ("*repa*",)
# grouping="modulation_adam": the adaLN modulation maps the timestep embedding, not hidden activations.
MODULATION = ("*modulation*",)


def _match_any(name: str, patterns: Sequence[str]) -> str | None:
    return next((pat for pat in patterns if fnmatch.fnmatchcase(name, pat)), None)


def muon_param_groups(
    model: nn.Module,
    *,
    muon_params: Sequence[str] = (),
    adam_params: Sequence[str] = (),
    blocks_name: str = "blocks",
    grouping: str = "recipe",
    ns_chunks: Mapping[str, int] | None = None,
    muon_settings: dict | None = None,
    adam_settings: dict | None = None,
) -> list[dict]:
    """Split a model's trainable parameters into Muon group(s) and an Adam group.

    Default: 2D weights of modules inside any nn.ModuleList/Sequential named `blocks_name` go to Muon,
    except embeddings and "*repa*" names (and "*modulation*" with grouping="modulation_adam").
    `muon_params` / `adam_params` are fnmatch patterns on parameter names that override the default
    (adam_params wins); `ns_chunks` maps patterns of Muon matrices to a row-block count, each count its own
    group "muon/<pattern>". A pattern that matches nothing is an error. Returns
    [{"params", "use_muon": True, "name": "muon", **muon_settings}, ..., {"params", "use_muon": False,
    "name": "adam", **adam_settings}], leaving out empty groups.
    """
    if isinstance(muon_params, str) or isinstance(adam_params, str):
        raise TypeError("muon_params / adam_params must be lists of name patterns, not one string")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping={grouping!r}; choose one of {GROUPINGS}")
    ns_chunks = dict(ns_chunks or {})
    for pattern, k in ns_chunks.items():
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"ns_chunks[{pattern!r}]={k!r}; expected an integer >= 1 (row blocks)")
    default_adam = ALWAYS_ADAM + (MODULATION if grouping == "modulation_adam" else ())
    block_prefixes = [
        name + "."
        for name, module in model.named_modules()
        if name.split(".")[-1] == blocks_name and isinstance(module, (nn.ModuleList, nn.Sequential))
    ]
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in m.parameters(recurse=False)
    }
    used: set[str] = set()
    muon: dict[str | None, list] = {None: []}  # chunk pattern (None: whole matrices) -> params
    adam = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        forced_adam = _match_any(name, adam_params)
        forced_muon = _match_any(name, muon_params)
        if forced_adam is not None:
            used.add(forced_adam)
            adam.append(p)
            continue
        if forced_muon is not None:
            used.add(forced_muon)
            if p.ndim != 2:
                raise ValueError(
                    f"muon_params pattern {forced_muon!r} matched {name!r} of shape {tuple(p.shape)}; "
                    "Muon takes 2D matrices only -- narrow the pattern"
                )
        elif not (
            any(name.startswith(prefix) for prefix in block_prefixes)
            and p.ndim == 2
            and id(p) not in embedding_params
            and _match_any(name, default_adam) is None
        ):
            adam.append(p)
            continue
        chunk_pattern = _match_any(name, list(ns_chunks))
        if chunk_pattern is not None:
            used.add(chunk_pattern)
            if p.shape[0] % ns_chunks[chunk_pattern]:
                raise ValueError(
                    f"ns_chunks[{chunk_pattern!r}]={ns_chunks[chunk_pattern]} does not divide the {p.shape[0]} rows "
                    f"of {name!r}"
                )
        muon.setdefault(chunk_pattern, []).append(p)
    unused = [pat for pat in (*muon_params, *adam_params, *ns_chunks) if pat not in used]
    if unused:
        names = [n for n, _ in model.named_parameters()][:8]
        raise ValueError(f"parameter pattern(s) {unused} matched no trainable parameter; names look like {names}")
    n_muon = sum(len(v) for v in muon.values())
    if not n_muon and not adam:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if not n_muon:
        log.warning("muon_param_groups: no parameter went to Muon (no 2D weights under a %r module list)", blocks_name)
    log.info("muon_param_groups (%s): %d tensors to Muon, %d to Adam", grouping, n_muon, len(adam))
    groups = []
    for pattern, params in muon.items():
        if params:
            extra = {} if pattern is None else {"name": f"muon/{pattern}", "ns_chunks": ns_chunks[pattern]}
            groups.append({"params": params, "use_muon": True, "name": "muon", **(muon_settings or {}), **extra})
    if adam:
        groups.append({"params": adam, "use_muon": False, "name": "adam", **(adam_settings or {})})
    return groups
