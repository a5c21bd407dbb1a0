"""The fixed names of driftlens's data: dims, sites, modalities, token coordinates.

Every stage reads and writes these names (``DESIGN.md``): the capture writes them into the store,
the drift report keeps them as its dims, ranks and plots select by them. They live here, in a leaf
module that imports nothing, so that a name is spelled once.

Store (``open_store``): ``{site}`` arrays ``[checkpoint, layer, token, {site}_dim]`` (``[checkpoint,
token, {site}_dim]`` for the unlayered sites), one row per captured token, with the per-token
coordinates :data:`TOKEN_COORDS`. Report (``drift``): variables over :data:`REPORT_DIMS` (or a
prefix of them: cross-modal metrics have no ``modality`` dim, MIR no ``site`` dim).
"""
from __future__ import annotations

from typing import Literal

Site = Literal["embed", "hidden", "key", "query", "route", "final"]
#: where in the model a token's vector is read: the input embedding, a decoder layer's output, its
#: attention keys, its queries, its mixture-of-experts routing distribution (sparse layers only), the
#: final norm's output
SITES: tuple[Site, ...] = ("embed", "hidden", "key", "query", "route", "final")
#: the feature dim of each site's array in the store
SITE_DIMS: dict[str, str] = {"embed": "hidden_dim", "hidden": "hidden_dim", "key": "key_dim", "query": "query_dim",
                             "route": "expert", "final": "hidden_dim"}
#: the site holding per-token routing distributions over experts (read by the routing metrics, not by
#: the distributional ones)
ROUTE_SITE: Site = "route"
#: sites with one vector per token and checkpoint (no ``layer`` dim)
UNLAYERED: tuple[Site, ...] = ("embed", "final")

Modality = Literal["visual", "text"]
MODALITIES: tuple[Modality, ...] = ("visual", "text")

#: per-token coordinates of a store: probe id, probe group, cluster (the unit of independence),
#: position in the sequence, modality, language
TOKEN_COORDS: tuple[str, ...] = ("sample", "group", "cluster", "position", "modality", "lang")
#: the coordinates that may name the unit of resampling, in order of preference
CLUSTER_COORDS: tuple[str, ...] = ("cluster", "group", "sample")

STORE_DIMS: tuple[str, ...] = ("checkpoint", "layer", "token")
REPORT_DIMS: tuple[str, ...] = ("checkpoint", "layer", "site", "modality")
