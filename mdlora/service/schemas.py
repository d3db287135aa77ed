"""Request and response bodies of the scoring API (pydantic v2; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    model_validator,
)

FeatureValue = str | int | float | bool | None | list[str | int | float]
def _id(value: Any) -> Any:
    """An id is a string or an integer: 196.0 (a float64 id column serialised) is 196; true,
    false and 196.5 are refused (they used to pass as the ids 1 and 0)."""
    if isinstance(value, bool):
        raise ValueError("an id is a string or an integer, not true/false")
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"an id is a string or an integer, got {value}")
    return value


Id = Annotated[StrictStr | StrictInt, BeforeValidator(_id)]
# A domain is named by a string; an integer is taken as its decimal string ("occupation": 4).
DomainName = Annotated[str, Field(max_length=128)] | int


class UserIn(BaseModel):
    """The user: an id (features are then read from the feature store) and/or raw features."""

    model_config = ConfigDict(extra="forbid")
    id: Id | None = Field(None, description="user id (fills the model's user-id column)")
    features: dict[str, FeatureValue] = Field(
        default_factory=dict, description="raw feature values by column name, e.g. {'gender': 'F'}"
    )


class ItemIn(BaseModel):
    """One candidate item: an id and/or raw features."""

    model_config = ConfigDict(extra="forbid")
    id: Id | None = Field(None, description="item id (fills the model's item-id column)")
    features: dict[str, FeatureValue] = Field(default_factory=dict)


class PredictRequest(BaseModel):
    """One user, a list of candidate items, and the domain to score them in. Exactly one of
    ``items`` and ``item_ids`` is a list (the other absent or null)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"domain": "25", "user": {"id": 42}, "item_ids": [1193, 661, 914]}],
            # a list, not merely present: {"item_ids": null} matches neither branch
            "oneOf": [
                {"required": [name], "properties": {name: {"type": "array"}}}
                for name in ("items", "item_ids")
            ],
        },
    )
    domain: DomainName | None = Field(
        None, description="domain name in the primary division (may come from the user's features)"
    )
    domains: dict[str, DomainName] = Field(
        default_factory=dict, description="domain per division name (MultiLoRA: both divisions)"
    )
    user: UserIn = Field(default_factory=lambda: UserIn.model_validate({}))
    items: list[ItemIn] | None = Field(None, min_length=1, description="candidates with features")
    item_ids: list[Id] | None = Field(None, min_length=1, description="candidates by id only")
    request_id: str | None = Field(None, max_length=200, description="echoed in the answer")

    @model_validator(mode="after")
    def _one_item_list(self) -> PredictRequest:
        if (self.items is None) == (self.item_ids is None):
            raise ValueError("give exactly one of 'items' (objects) or 'item_ids' (a list of ids)")
        return self


class PredictResponse(BaseModel):
    """One score per item, in request order, and what produced them."""

    scores: list[float] = Field(description="click probabilities, one per item, in order")
    model_version: str = Field(description="artifact the backbone comes from")
    adapter_versions: dict[str, int] = Field(description="adapter version used, per division")
    domains: dict[str, str] = Field(description="domain used, per division")
    backbone_only: bool = Field(
        description="true when an unknown domain was scored without adapter"
    )
    registry_version: int = Field(description="registry version of the snapshot that answered")
    request_id: str | None = None
    warnings: list[str] = Field(default_factory=list)


class BatchPredictRequest(BaseModel):
    """Several predict requests answered with one model call."""

    model_config = ConfigDict(extra="forbid")
    requests: list[PredictRequest] = Field(min_length=1)


class BatchPredictResponse(BaseModel):
    results: list[PredictResponse]


class ErrorBody(BaseModel):
    """Every error answer: ``detail`` says what went wrong and what to do."""

    detail: Any
    model_config = ConfigDict(extra="allow")


class AdapterVersion(BaseModel):
    version: int
    origin: str
    sha256: str
    package_sha256: str | None = None  # config and weights together (registered versions)
    size: int | None = None
    created_at: float | None = None


class AdapterInfo(BaseModel):
    division: str
    domain: str
    active_version: int | None
    origin: str | None
    trained_with_artifact: bool
    grown_ids: int = Field(
        0,
        description="ids the served version brought that the export never saw (new users, "
        "items, ...), each with an embedding row of its own",
    )
    versions: list[AdapterVersion]


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    registry_version: int
    registry: str


class AdapterChange(BaseModel):
    division: str
    domain: str
    version: int | None
    registry_version: int
    action: str | None = None
    origin: str | None = None
    sha256: str | None = None
    new_domain: bool | None = None
    warnings: list[str] | None = None


class Health(BaseModel):
    status: str
    registry: str | None = None
    adapters: str | None = None  # registered adapters that could not be loaded, and why
    registry_version: int | None = None
    model_version: str | None = None
    snapshot_age_seconds: float | None = None
