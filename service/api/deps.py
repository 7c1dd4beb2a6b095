"""FastAPI dependencies as ``Annotated`` aliases, declared once and used in route signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.job_service import JobService
from service.api.state import AppState
from service.settings import Settings


def get_state(request: Request) -> AppState:
    return request.app.state.segquant


def get_jobs(state: Annotated[AppState, Depends(get_state)]) -> JobService:
    return state.jobs


def get_app_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


StateDep = Annotated[AppState, Depends(get_state)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
