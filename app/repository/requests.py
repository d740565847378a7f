"""What ``PUT /v2/repository/models/{name}/rollout`` takes (docs/rollouts.md), validated."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.repository.rollout import Mode, Plan


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(
        max_length=19, description="The version to roll out, beside the one serving (the baseline)"
    )
    mode: Mode = Field(
        Mode.CANARY,
        description="canary: a share of requests answered by the candidate; shadow: every request "
        "answered by the baseline and a copy run on the candidate",
    )
    percent: float | None = Field(
        None,
        gt=0,
        le=100,
        description="canary: the share of requests the candidate answers (required); shadow: none",
    )
    sticky: bool = Field(
        False,
        description="canary: each caller (its key, or its address without keys) always gets the "
        "same version",
    )
    min_agreement: float = Field(
        0.95, ge=0, le=1, description="Roll back below this top-1 agreement with the baseline"
    )
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="Roll back above this share of candidate server errors"
    )
    min_requests: int = Field(
        200, ge=1, le=10_000_000, description="Judge only after this many compared requests"
    )
    compare_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="The most of the compute comparisons take (default: rollout_compare_share)",
    )

    @model_validator(mode="after")
    def _percent_for_canary(self) -> Self:
        if self.mode is Mode.CANARY and self.percent is None:
            raise ValueError("a canary needs percent: the share of requests for the candidate")
        if self.mode is Mode.SHADOW and self.percent is not None:
            raise ValueError("a shadow takes no percent: every request is copied")
        return self

    def plan(
        self, ident: str, model: str, baseline: str, candidate: str, compare_share: float
    ) -> Plan:
        """``compare_share``: the server's, where the request gives none."""
        return Plan(
            ident=ident,
            model=model,
            baseline=baseline,
            candidate=candidate,
            mode=self.mode,
            percent=self.percent if self.percent is not None else 100.0,
            sticky=self.sticky,
            min_agreement=self.min_agreement,
            max_error_rate=self.max_error_rate,
            min_requests=self.min_requests,
            compare_share=self.compare_share or compare_share,
        )
