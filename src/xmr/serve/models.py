"""Request and response bodies of the JSON API (they are what /docs and /openapi.json describe)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_image, too_large, busy.")
    message: str = Field(description="What went wrong, for people.")
    details: Any = Field(default=None, description="Validation errors: a list of {loc, msg, type}.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ((400, "Invalid image or query refused by the model"), (401, "Missing or wrong API key"),
                         (404, "Unknown image id"), (413, "Upload or image too large"),
                         (415, "Upload is not an image"), (422, "Invalid parameters"),
                         (503, "Too many queries waiting; retry later"))
}


RERANK_DEPTH_HELP = ("K', how many index results the method re-scores in its second stage (reranking methods "
                     "only; default: the method's own; 0 = index order only; at most settings.max_rerank_depth).")

REFINE_HELP = ("Second stage on or off (MMRef's reference-based refinement, AsCL's fused re-scoring); "
               "default: on for methods that have one.")
REFINE_K_HELP = ("How many of the index's top results are refined (the same K' as rerank_depth; at most "
                 "settings.max_refine_k).")


class TextQuery(BaseModel):
    text: str = Field(description="What to look for, in words.", examples=["a woman in a red jacket"])
    k: int | None = Field(default=None, description="How many results (default: settings.default_k).")
    rerank_depth: int | None = Field(default=None, description=RERANK_DEPTH_HELP)
    refine: bool | None = Field(default=None, description=REFINE_HELP)
    refine_k: int | None = Field(default=None, description=REFINE_K_HELP)


class SimilarQuery(BaseModel):
    id: int = Field(description="Index id of an image from earlier results.")
    k: int | None = Field(default=None, description="How many results (default: settings.default_k).")
    rerank_depth: int | None = Field(default=None, description=RERANK_DEPTH_HELP)
    refine: bool | None = Field(default=None, description=REFINE_HELP)
    refine_k: int | None = Field(default=None, description=REFINE_K_HELP)


class Result(BaseModel):
    id: int = Field(description="Index id of the image.")
    score: float = Field(description="Similarity to the query (higher is closer): the final (re-ranked) score.")
    first_stage_score: float | None = Field(default=None, description="The index's cosine similarity (stage 1).")
    initial_score: float | None = Field(default=None, description="MMRef: S_init, the cosine before refinement "
                                        "(absent for results that were not refined).")
    reference_score: float | None = Field(default=None, description="MMRef: S_ref, the similarity of the "
                                          "query's and the image's profiles over the training references.")
    score_parts: dict[str, float] = Field(default_factory=dict, description="Every part of the second-stage "
                                          "score the method reports (e.g. score_global, score_local).")
    path: str = Field(description="Path relative to the served images root.")
    thumbnail_url: str
    image_url: str


class QueryEcho(BaseModel):
    kind: Literal["text", "image", "composed", "similar"]
    k: int
    text: str | None = None
    id: int | None = Field(default=None, description="The indexed image of a 'similar' query.")
    width: int | None = Field(default=None, description="Size of the uploaded image.")
    height: int | None = None


class SearchResponse(BaseModel):
    results: list[Result]
    took_ms: float = Field(description="Server time for the query, queueing included.")
    query: QueryEcho


class Health(BaseModel):
    status: Literal["ok"]
    count: int = Field(description="Images in the index.")
    model_id: str
    supports_composed: bool = Field(description="Whether /api/search/composed can be answered.")
    rerank_depth: int = Field(default=0, description="K' of the method's second stage (0: a one-stage method); "
                                                     "the page offers a refine switch when > 0.")
    auth_required: bool = Field(description="Whether /api routes need the X-API-Key header.")
    version: str
    limits: dict[str, int]


class Latency(BaseModel):
    p50: float | None
    p90: float | None
    p99: float | None


class RouteMetrics(BaseModel):
    count: int
    errors: int
    latency_ms: Latency


class MetricsResponse(BaseModel):
    queries: int = Field(description="Search requests (any outcome).")
    query_errors: int
    errors: int = Field(description="API requests answered with a status >= 400.")
    rejected: int = Field(description="Requests refused with 503 because the query queue was full.")
    latency_ms: Latency = Field(description="Search latency percentiles over the recent window.")
    by_route: dict[str, RouteMetrics]
    status: dict[str, int] = Field(description="Responses by HTTP status.")
    uptime_s: float
    in_flight: int = Field(description="Queries running or waiting now.")
    capacity: int = Field(description="max_concurrency + max_queue.")
