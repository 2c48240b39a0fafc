"""Service settings, read from ``GATEWAY_*`` environment variables (nested groups use ``__``)."""

from __future__ import annotations

import json
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

from core.domain import Destination, DestinationTls

#: Passwords nobody may run a hospital service with.
WEAK_SECRETS = {"", "postgres", "password", "changeme", "change-me", "secret", "orthanc", "gateway", "admin"}

_AE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.")


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 16 or not set(value) <= _AE_CHARS:
        raise ValueError(f"AE title {value!r} must be 1-16 characters of letters, digits, space, _ - .")
    return value


def _pem_file(value: object, what: str) -> Path:
    """A PEM file named in the settings; it must exist now, not at the first association."""
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}: {path} does not exist or is not a file")
    return path


def _env_list(value: object, separator: str = ",") -> object:
    """A list setting from the environment: a JSON array, or items joined by ``separator``."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(separator) if part.strip()]
    return value


class DicomSettings(BaseModel):
    ae_title: str = "GATEWAY"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests)
    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_aes: Annotated[list[str], NoDecode] = []
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    maximum_associations: int = Field(16, ge=1, le=256)
    #: Processes `gateway serve` runs admitted plain-TCP associations in (dicom_listener.receivers); 0: all
    #: run in the listening process.
    receiver_processes: int = Field(2, ge=0, le=64)
    #: DICOM TLS (PS3.15 B.1, TLS 1.2 or later) on this second port, besides the plain one; unset: no TLS.
    tls_port: int | None = Field(None, ge=0, le=65535)  # 0: any free port (tests)
    #: Our certificate (PEM, may hold the chain) and its unencrypted private key (PEM); needed with TLS_PORT.
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    #: CA bundle (PEM) that client certificates are verified against (when a client presents one).
    tls_ca_certificates: Path | None = None
    #: Refuse TLS clients without a certificate signed by TLS_CA_CERTIFICATES.
    tls_require_client_certificate: bool = False
    #: Largest P-DATA-TF PDU we receive (the Maximum Length we announce, bytes); a longer one aborts.
    maximum_pdu_size: int = Field(1 << 20, ge=4096, le=64 << 20)
    #: Largest A-ASSOCIATE-RQ (or other non-data PDU), bytes; a longer one aborts before its body is read.
    max_association_pdu: int = Field(64 << 10, ge=4096, le=16 << 20)
    #: A new connection must deliver its whole A-ASSOCIATE-RQ within this many seconds (ARTIM), or is closed.
    association_request_timeout: float = Field(10.0, gt=0)
    #: Connections still waiting for their A-ASSOCIATE-RQ, all peers together; a new one displaces the oldest.
    max_pending_connections: int = Field(64, ge=1)
    #: Concurrent connections from one IP address outside trusted_networks (0: no limit).
    max_connections_per_address: int = Field(8, ge=0)
    #: Networks exempt from the per-address limit (CIDR, comma-separated or JSON), e.g. a PACS router.
    trusted_networks: Annotated[list[IPvAnyNetwork], NoDecode] = [
        IPv4Network("127.0.0.0/8"),
        IPv6Network("::1/128"),
    ]

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    _split = field_validator("allowed_calling_aes", "trusted_networks", mode="before")(
        classmethod(lambda cls, v: _env_list(v))
    )

    @model_validator(mode="after")
    def _tls(self) -> DicomSettings:
        var = "GATEWAY_DICOM__"
        files = {
            "TLS_CERTIFICATE": self.tls_certificate,
            "TLS_PRIVATE_KEY": self.tls_private_key,
            "TLS_CA_CERTIFICATES": self.tls_ca_certificates,
        }
        if self.tls_port is None:
            named = [var + k for k, v in files.items() if v]
            if self.tls_require_client_certificate:
                named.append(var + "TLS_REQUIRE_CLIENT_CERTIFICATE")
            if named:
                raise ValueError(f"{', '.join(named)} set but {var}TLS_PORT is not: TLS would be off")
            return self
        if self.tls_port and self.tls_port == self.port:
            raise ValueError(f"{var}TLS_PORT must differ from {var}PORT")
        if self.tls_certificate is None or self.tls_private_key is None:
            raise ValueError(f"{var}TLS_PORT needs {var}TLS_CERTIFICATE and {var}TLS_PRIVATE_KEY")
        if self.tls_require_client_certificate and self.tls_ca_certificates is None:
            raise ValueError(f"{var}TLS_REQUIRE_CLIENT_CERTIFICATE needs {var}TLS_CA_CERTIFICATES")
        for key, path in files.items():
            if path is not None:
                _pem_file(path, var + key)
        return self


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    #: Host header values answered (DNS rebinding); HOST is added unless it is a wildcard; "*" allows any.
    allowed_hosts: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "::1"]
    #: Largest STOW-RS request body (bytes); larger ones get 413.
    stow_max_body_bytes: int = Field(4 << 30, ge=1)
    #: Most application/dicom parts in one STOW-RS request; more get 413.
    stow_max_parts: int = Field(10_000, ge=1)
    #: A STOW-RS upload that sends nothing for this long is dropped with 408.
    stow_idle_seconds: float = Field(60.0, gt=0)
    #: Worker threads STOW-RS requests share for parsing and storing, apart from the other routes' pool.
    stow_threads: int = Field(4, ge=1, le=64)
    #: GET /metrics without credentials from this host (127.0.0.1, ::1); set false when a reverse proxy on
    #: this host forwards other hosts' requests without X-Forwarded-For (they would look local).
    metrics_from_loopback: bool = True

    _split = field_validator("allowed_hosts", mode="before")(classmethod(lambda cls, v: _env_list(v)))

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: list[str]) -> list[str]:
        for name in value:
            if "*" in name and name != "*" and not (name.startswith("*.") and "*" not in name[1:]):
                raise ValueError(f"{name!r}: a wildcard must be '*' or like '*.example.org'")
        return value

    @property
    def trusted_hosts(self) -> list[str]:
        """``allowed_hosts`` plus HOST, as Starlette compares them (IPv6 literals in brackets)."""
        names = [*self.allowed_hosts]
        if self.host not in ("", "0.0.0.0", "::"):
            names.append(self.host)
        if "*" in names:
            return ["*"]
        bracketed = [f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names]
        return list(dict.fromkeys(n.lower() for n in bracketed))


class AuthSettings(BaseModel):
    """Sign-in, browser sessions and API tokens."""

    #: A browser session unused for this long is over (sign in again).
    session_idle_minutes: float = Field(30.0, gt=0)
    #: A browser session ends this long after sign-in, however busy.
    session_absolute_hours: float = Field(12.0, gt=0)
    #: Session cookie with the Secure flag: None decides per request (set when the request came over HTTPS).
    secure_cookies: bool | None = None
    #: Failed sign-ins allowed per user name within the window; more get 429 (no password is checked).
    login_max_failures: int = Field(5, ge=1)
    #: Failed sign-ins allowed per client address within the window (several users may share one address).
    login_max_failures_per_address: int = Field(20, ge=1)
    login_window_seconds: float = Field(300.0, gt=0)
    #: Days an API token lives when `gateway tokens create` is not told otherwise (0: no expiry).
    token_days: int = Field(365, ge=0)


class CompletionSettings(BaseModel):
    #: A released study is complete once nothing new arrived for this long.
    quiet_seconds: float = Field(2.0, ge=0)
    #: Any study is complete once nothing arrived for this long, released or not.
    max_wait_seconds: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> CompletionSettings:
        if self.max_wait_seconds < self.quiet_seconds:
            raise ValueError("max_wait_seconds must be at least quiet_seconds")
        return self


class WorkerSettings(BaseModel):
    #: Worker child processes `gateway serve` starts and restarts (0: none, run `gateway worker` processes
    #: instead). GATEWAY_WORKER__THREADS, its name before workers became processes, is still accepted.
    processes: int = Field(2, ge=0, le=32, validation_alias=AliasChoices("processes", "threads"))
    #: Address-space limit (RLIMIT_AS, MB) of each worker process, so a decoder that runs away kills only
    #: its worker; 0: no limit.
    memory_limit_mb: int = Field(4096, ge=0)
    #: CPU priority (nice increment, 0-19) of each worker process: on a busy host the DICOM listener and
    #: the HTTP API run first, so modalities are acknowledged at full speed while inference catches up.
    nice: int = Field(10, ge=0, le=19)
    #: Threads each worker process gives its numeric libraries (NumPy's BLAS, OpenCV, LiteRT). Parallelism
    #: comes from the worker processes; more threads per process only oversubscribe the cores (BLAS and
    #: LiteRT threads spin while they wait: measured at 5 studies/s on 2 cores, 2 threads per process cost
    #: more than the work itself in the gates' matrix products). 0: the libraries' defaults.
    compute_threads: int = Field(1, ge=0, le=64)
    #: Delivery lanes per worker process: threads beside the main loop that take only deliveries, verified
    #: reports and Orthanc pulls (jobs that mostly wait on the network), so an SR goes out while the main
    #: loop runs the next study, and a slow PACS never holds up inference. 0: the main loop does everything.
    delivery_lanes: int = Field(1, ge=0, le=16)
    #: While this host stores instances faster than this (MB/s over the last second: several modalities or
    #: a PACS pushing at once), workers start no inference or rendering job, so the senders get the CPU and
    #: are acknowledged at full speed; deliveries and verified reports still go. 0: never hold back.
    ingest_first_mb_per_s: float = Field(32.0, ge=0)
    #: A worker holds back at most this long (a burst of a few hundred CR images, a CT series), then works
    #: even while the ingest goes on, so results are late but never starved.
    ingest_first_max_seconds: float = Field(60.0, ge=0)
    #: How often a worker refreshes its worker_heartbeat row.
    heartbeat_seconds: float = Field(5.0, gt=0)
    #: /readyz counts a worker alive while its heartbeat is younger than this.
    heartbeat_timeout_seconds: float = Field(15.0, gt=0)
    #: /readyz fails once the oldest due job has waited longer than this for a worker (0: no bound).
    max_queue_wait_seconds: float = Field(600.0, ge=0)
    poll_seconds: float = Field(0.1, gt=0)
    #: A claimed job whose worker stopped renewing it is taken over after this long.
    lease_seconds: float = Field(300.0, gt=0)
    max_attempts: int = Field(8, ge=1)
    #: Deliveries keep retrying longer than other jobs: a PACS may be down for hours (30 tries ~ 4 h).
    delivery_max_attempts: int = Field(30, ge=1)
    #: First retry delay for failed deliveries and jobs; doubles each attempt (with jitter) up to the cap.
    retry_base_seconds: float = Field(2.0, gt=0)
    retry_cap_seconds: float = Field(600.0, gt=0)
    #: A job whose worker died (lease expired) this many times is quarantined: failed, never claimed again.
    max_takeovers: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _heartbeat_order(self) -> WorkerSettings:
        if self.heartbeat_timeout_seconds <= self.heartbeat_seconds:
            raise ValueError("heartbeat_timeout_seconds must be longer than heartbeat_seconds")
        return self


class InferenceSettings(BaseModel):
    #: Extra directories holding model bundles (model.json + model.tflite), besides the shipped weights.
    model_dirs: Annotated[list[Path], NoDecode] = []
    #: The fixed evaluation set of each model's promotion gate: model name -> a labels CSV (or a folder
    #: holding labels.csv) in the training data's vocabulary, e.g. '{"pneumonia": "/data/eval/pneumonia"}'.
    evaluation_sets: dict[str, Path] = {}
    #: How much lower than the active model's a candidate's sensitivity may be and still be promoted.
    sensitivity_margin: float = Field(0.02, ge=0, le=1)
    #: Drift warnings on the performance page: a version's live share of not-assessable images, or its live
    #: mean probability of a finding, further than this (absolute) from its reference figures (set by the
    #: promotion gate or `gateway models reference`), once it has answered drift_min_images images.
    drift_not_assessable_band: float = Field(0.05, ge=0, le=1)
    drift_probability_band: float = Field(0.10, ge=0, le=1)
    drift_min_images: int = Field(30, ge=1)

    _split = field_validator("model_dirs", mode="before")(classmethod(lambda cls, v: _env_list(v, ":")))


class RoutingSettings(BaseModel):
    """Routing rules (see inference.routing); each list is JSON or comma separated in the environment."""

    fundus_modalities: Annotated[list[str], NoDecode] = ["OP", "XC"]
    #: Ophthalmic Photography 8/16 bit, VL Photographic Image.
    fundus_sop_classes: Annotated[list[str], NoDecode] = [
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",
        "1.2.840.10008.5.1.4.1.1.77.1.4",
    ]
    fundus_body_parts: Annotated[list[str], NoDecode] = ["EYE"]
    fundus_keywords: Annotated[list[str], NoDecode] = ["fundus", "retina", "fundoscopy", "papilla"]
    chest_modalities: Annotated[list[str], NoDecode] = ["CR", "DX"]
    #: An empty string stands for a missing or empty BodyPartExamined (the model's gate then decides).
    chest_body_parts: Annotated[list[str], NoDecode] = ["CHEST", "THORAX", ""]
    fundus_models: Annotated[list[str], NoDecode] = ["glaucoma"]
    chest_models: Annotated[list[str], NoDecode] = ["pneumonia", "covid19"]

    _split = field_validator("*", mode="before")(classmethod(lambda cls, v: _env_list(v)))


class OrthancSettings(BaseModel):
    """An Orthanc the gateway pulls stable studies from (webhook + /changes) and uploads its reports to."""

    #: Orthanc REST root, e.g. http://orthanc:8042; empty disables the integration.
    url: str | None = None
    username: str | None = None
    password: str | None = None
    #: Shared secret the plugin sends as X-Gateway-Secret; without it the webhook refuses everything.
    webhook_secret: str | None = None
    #: Upload every report into the Orthanc study it came from (besides GATEWAY_DESTINATIONS).
    upload_reports: bool = True
    #: How often a worker reads Orthanc's /changes feed for studies the webhook missed (0: never).
    reconcile_seconds: float = Field(10.0, ge=0)
    timeout: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else None


class ReportingSettings(BaseModel):
    #: Also write a Secondary Capture with the result burned in (later issue).
    secondary_capture: bool = False
    #: Also write the PDF result (GET /studies/{uid}/report.pdf) as a DICOM Encapsulated PDF in the study,
    #: delivered with the SRs, again after each radiologist's decision.
    encapsulated_pdf: bool = False
    #: Series Number of the SRs; their captures take the next, the PDF documents the one after.
    series_number: int = Field(9901, ge=1)


class ReviewSettings(BaseModel):
    """The radiologists' worklist and case page (GATEWAY_REVIEW__*)."""

    #: A finding whose probability lies within this of its model's threshold is "uncertain" (shown first).
    uncertain_band: float = Field(0.1, ge=0, le=1)
    #: Share of AI-negative cases (nothing present, nothing uncertain) drawn at random, by their Study
    #: Instance UID, and listed first, marked "random check": reviews of AI-positive cases alone cannot
    #: measure what the AI misses (verification bias). 0: none.
    negative_sample_share: float = Field(0.05, ge=0, le=1)
    #: How long opening a case marks it as being reviewed by that user.
    claim_minutes: float = Field(15.0, gt=0)
    #: "Open in viewer" link, e.g. "https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}"
    #: (placeholders: {study_uid}, {accession}); none: no link.
    viewer_url_template: str | None = None
    #: Verifying Organization of the verified reports.
    organization: str = Field("screening-gateway", min_length=1, max_length=64)
    #: Worklist rows per page.
    page_size: int = Field(50, ge=5, le=500)
    #: Longest side of the image the case page shows, in pixels.
    display_max_side: int = Field(2048, ge=256, le=8192)

    @field_validator("viewer_url_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://", "/")):
            raise ValueError("must start with http://, https:// or /")
        try:
            value.format(study_uid="1.2", accession="A")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"placeholders are {{study_uid}} and {{accession}}: {exc}") from None
        return value


class ExportSettings(BaseModel):
    """De-identified label exports (GATEWAY_EXPORT__*)."""

    #: The project key pseudonymous UIDs, patient ids and date shifts derive from (HMAC-SHA256): the same key
    #: gives the same pseudonyms in every export. Unset: a random key made once in DATA_DIR/export.key.
    key: SecretStr | None = None
    #: The Retain Patient Characteristics Option (PS3.15 E.3.6): keep sex, age, size and weight.
    keep_patient_characteristics: bool = False


class IngestSettings(BaseModel):
    """What one instance may cost: checked at C-STORE and STOW before storage, again before decoding."""

    #: Rows x Columns x Samples x Frames of one instance.
    max_pixels: int = Field(400_000_000, ge=1)
    #: Decoded pixel bytes of one instance (Rows x Columns x Samples x Frames x BitsAllocated / 8).
    max_decoded_bytes: int = Field(1 << 30, ge=1)
    #: Encoded size of one instance (bytes); larger ones are refused.
    max_instance_bytes: int = Field(2 << 30, ge=1)
    #: Deflated Explicit VR Little Endian: the inflated dataset may be at most this large.
    max_inflated_bytes: int = Field(256 << 20, ge=1)
    #: Sequences nested deeper than this are refused.
    max_sequence_depth: int = Field(32, ge=1)
    #: Data elements of one instance, sequence items and nested elements included (pydicom keeps one object
    #: per element: a flood of empty elements would cost gigabytes).
    max_elements: int = Field(500_000, ge=1)


class UploadSettings(BaseModel):
    """Browser upload of JPEG/PNG/DICOM images (POST /api/upload)."""

    #: Bytes of one uploaded file; larger files are refused with 413.
    max_file_bytes: int = Field(50 << 20, ge=1)
    #: Files in one upload (one study for the JPEG/PNG files).
    max_files: int = Field(20, ge=1)
    #: Pixels of one JPEG/PNG image, read from its header before it is decoded (decompression bombs).
    max_pixels: int = Field(60_000_000, ge=1)


class StorageSettings(BaseModel):
    #: Free space (bytes) kept on the storage volume: below it C-STORE answers 0xA700 and STOW 507.
    reserve_bytes: int = Field(1 << 30, ge=0)
    #: C-STORE datasets are written to disk as they arrive with O_DIRECT, past the page cache (see
    #: core.storage.DirectTempFile); off for a volume where direct writes are slow (some network file
    #: systems).
    direct_writes: bool = True
    #: Studies whose last instance arrived more than this many days ago are deleted (rows, files, results;
    #: audited) by a scheduled job; 0 keeps everything.
    retention_days: int = Field(0, ge=0)
    #: How often the workers look for studies past the retention.
    retention_check_seconds: float = Field(3600.0, gt=0)


_DESTINATION_KEYS = {"name", "ae_title", "host", "port"}
#: Optional keys of a destination: "tls": true turns DICOM TLS on; the files are PEM.
DESTINATION_TLS_KEYS = {
    "tls",
    "tls_ca_certificates",
    "tls_certificate",
    "tls_private_key",
    "tls_verify_hostname",
}


def _destination_tls(item: dict[str, object]) -> DestinationTls | None:
    """The TLS part of one destination of GATEWAY_DESTINATIONS; its files must exist at start-up."""
    name = item["name"]
    tls = item.get("tls", False)
    if not isinstance(tls, bool):
        raise ValueError(f"destination {name!r}: tls must be true or false")
    if not tls:
        extra = sorted(k for k in DESTINATION_TLS_KEYS - {"tls"} if k in item)
        if extra:
            raise ValueError(f'destination {name!r}: {", ".join(extra)} given without "tls": true')
        return None
    files: dict[str, Path | None] = {}
    for key in ("tls_ca_certificates", "tls_certificate", "tls_private_key"):
        given = item.get(key)
        files[key] = _pem_file(given, f"destination {name!r}: {key}") if given else None
    if (files["tls_certificate"] is None) != (files["tls_private_key"] is None):
        raise ValueError(f"destination {name!r}: tls_certificate and tls_private_key go together")
    verify_hostname = item.get("tls_verify_hostname", True)
    if not isinstance(verify_hostname, bool):
        raise ValueError(f"destination {name!r}: tls_verify_hostname must be true or false")
    return DestinationTls(
        ca_certificates=files["tls_ca_certificates"],
        certificate=files["tls_certificate"],
        private_key=files["tls_private_key"],
        verify_hostname=verify_hostname,
    )


class Settings(BaseSettings):
    """All configuration. Invalid values stop start-up with a message naming the setting."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_nested_delimiter="__", extra="ignore", case_sensitive=False
    )

    data_dir: Path = Path("./var")
    #: SQLAlchemy URL; default is a SQLite file in DATA_DIR. postgresql+psycopg://... works.
    database_url: str | None = None
    dicom: DicomSettings = DicomSettings()
    ingest: IngestSettings = IngestSettings()
    storage: StorageSettings = StorageSettings()
    upload: UploadSettings = UploadSettings()
    http: HttpSettings = HttpSettings()
    auth: AuthSettings = AuthSettings()
    completion: CompletionSettings = CompletionSettings()
    worker: WorkerSettings = WorkerSettings()
    inference: InferenceSettings = InferenceSettings()
    reporting: ReportingSettings = ReportingSettings()
    review: ReviewSettings = ReviewSettings()
    export: ExportSettings = ExportSettings()
    routing: RoutingSettings = RoutingSettings()
    orthanc: OrthancSettings = OrthancSettings()
    #: JSON list of {"name","ae_title","host","port"} (optionally "tls": true and the tls_* keys of
    #: DESTINATION_TLS_KEYS): where reports are sent.
    destinations: Annotated[list[Destination], NoDecode] = []
    log_level: str = "INFO"
    #: "production" refuses to start with missing or well-known secrets; "development" allows them.
    environment: Literal["development", "production"] = "development"

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else []
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg})") from None
        if not isinstance(value, list):
            raise ValueError("must be a JSON list of {name, ae_title, host, port}")
        out = []
        for item in value:
            if isinstance(item, Destination):
                out.append(item)
                continue
            if (
                not isinstance(item, dict)
                or not set(item) >= _DESTINATION_KEYS
                or not set(item) <= _DESTINATION_KEYS | DESTINATION_TLS_KEYS
            ):
                raise ValueError(
                    "each destination needs exactly name, ae_title, host, port, optionally "
                    f"{', '.join(sorted(DESTINATION_TLS_KEYS))}; got {item!r}"
                )
            port = int(item["port"])
            if not 1 <= port <= 65535:
                raise ValueError(f"destination {item['name']!r}: port {port} out of range")
            out.append(
                Destination(
                    name=str(item["name"]),
                    ae_title=_check_ae_title(str(item["ae_title"])),
                    host=str(item["host"]),
                    port=port,
                    tls=_destination_tls(item),
                )
            )
        names = [d.name for d in out]
        if len(set(names)) != len(names):
            raise ValueError("destination names must be unique")
        return out

    @model_validator(mode="after")
    def _orthanc_name(self) -> Settings:
        if (
            self.orthanc.url
            and self.orthanc.upload_reports
            and any(d.name == "orthanc" for d in self.destinations)
        ):
            raise ValueError("destination name 'orthanc' is reserved for GATEWAY_ORTHANC__URL uploads")
        return self

    @model_validator(mode="after")
    def _production_secrets(self) -> Settings:
        if self.environment != "production":
            return self
        problems = []
        if not self.database_url or not self.database_url.startswith("postgresql"):
            problems.append("GATEWAY_DATABASE_URL must point at PostgreSQL in production")
        else:
            password = make_url(self.database_url).password
            if not password or str(password).lower() in WEAK_SECRETS:
                problems.append("GATEWAY_DATABASE_URL has no password or a well-known default one")
        if self.orthanc.url:
            secret = self.orthanc.webhook_secret or ""
            if len(secret) < 16 or secret.lower() in WEAK_SECRETS:
                problems.append(
                    "GATEWAY_ORTHANC__WEBHOOK_SECRET must be at least 16 characters, not a default"
                )
            if self.orthanc.password and self.orthanc.password.lower() in WEAK_SECRETS:
                problems.append("GATEWAY_ORTHANC__PASSWORD is a well-known default")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'gateway.sqlite3').resolve()}"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def ingest_rate_dir(self) -> Path:
        """Where the receiving processes of this host count the bytes they store (core.activity)."""
        return self.data_dir / "ingest-rate"


class SettingsError(RuntimeError):
    """Raised at start-up for invalid configuration; the message names the environment variable."""


def load_settings() -> Settings:
    """Read settings from the environment, turning validation errors into one readable message."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "GATEWAY_" + "__".join(str(p).upper() for p in err["loc"] if not isinstance(p, int))
            lines.append(f"{name}: {err['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except (ValueError, json.JSONDecodeError) as exc:
        raise SettingsError(f"invalid configuration: {exc}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
