"""The part of Orthanc's REST API the gateway uses, through orthanc-api-client."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from orthanc_api_client import OrthancApiClient
from orthanc_api_client.exceptions import ConnectionError as OrthancConnectionError
from orthanc_api_client.exceptions import HttpError, OrthancApiException
from orthanc_api_client.exceptions import TimeoutError as OrthancTimeoutError
from requests import RequestException

from core.settings import OrthancSettings

log = logging.getLogger(__name__)

STABLE_STUDY = "StableStudy"
T = TypeVar("T")


class OrthancUnavailable(Exception):
    """Orthanc could not be reached or answered 5xx: worth retrying later."""


class OrthancRejected(Exception):
    """Orthanc answered 4xx: retrying the same request cannot help."""


@dataclass(frozen=True)
class StableStudyChange:
    seq: int
    orthanc_study_id: str


class OrthancSource:
    """Pull studies from, and push reports into, one Orthanc."""

    def __init__(self, settings: OrthancSettings) -> None:
        if not settings.url:
            raise ValueError("GATEWAY_ORTHANC__URL is not set")
        self.url = settings.url
        self._api = OrthancApiClient(settings.url, user=settings.username, pwd=settings.password)
        self._timeout = settings.timeout
        # orthanc-api-client sends no timeout: a hung Orthanc would hold a worker forever.
        session = self._api._http_session
        send = session.request

        def request(method: str, url: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self._timeout)
            return send(method, url, **kwargs)

        session.request = request

    def instance_ids(self, orthanc_study_id: str) -> list[str]:
        return self._call(lambda: self._api.studies.get_instances_ids(orthanc_study_id))

    def instance_file(self, orthanc_instance_id: str) -> bytes:
        return self._call(lambda: self._api.instances.get_file(orthanc_instance_id))

    def upload(self, data: bytes) -> list[str]:
        """Store a DICOM file; returns Orthanc's instance id(s). Uploading an existing instance is a no-op."""
        return self._call(lambda: self._api.upload(data))

    def stable_studies_since(self, seq: int, limit: int = 200) -> tuple[list[StableStudyChange], int, bool]:
        """StableStudy changes after ``seq``: (changes, last sequence number read, feed exhausted?)."""
        changes, last, done = self._call(lambda: self._api.get_changes(since=seq, limit=limit))
        stable = [
            StableStudyChange(int(c.sequence_id), str(c.resource_id))
            for c in changes
            if str(getattr(c.change_type, "value", c.change_type)) == STABLE_STUDY
        ]
        return stable, int(last), bool(done)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except HttpError as exc:
            status = int(getattr(exc, "http_status_code", 0) or 0)
            if 400 <= status < 500:
                raise OrthancRejected(f"Orthanc answered HTTP {status}") from exc
            raise OrthancUnavailable(f"Orthanc answered HTTP {status or '?'}") from exc
        except (
            OrthancConnectionError,
            OrthancTimeoutError,
            OrthancApiException,
            RequestException,
            OSError,
        ) as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url} unreachable: {type(exc).__name__}") from exc
