"""Typed settings for every epcwatch process.

Values come from, in order of precedence: keyword arguments, `EPCWATCH_*` environment variables,
an optional YAML file named by `EPCWATCH_CONFIG_FILE`, then the defaults below. Every threshold
carries its unit in its name.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class Settings(BaseSettings):
    """All epcwatch settings; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="EPCWATCH_", extra="forbid")

    # Kafka connection and topics.
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    topic_scans: str = Field("scan-events", description="input topic of scan events")
    topic_alerts: str = Field("anomaly-alerts", description="output topic of alerts")
    topic_drift: str = Field("drift-events", description="output topic of drift events")
    topic_dlq: str = Field("scan-events-dlq", description="dead-letter topic for bad input")
    topic_state: str = Field("epcwatch-state", description="compacted changelog of windows")
    topic_late: str = Field("scan-events-late", description="scans beyond the lateness bound")
    topic_partitions: int = Field(4, ge=1, description="partitions of the scan/state topics")
    topic_replication: int = Field(1, ge=1, description="replication factor of created topics")
    group_id: str = Field("epcwatch-detector", description="detector consumer group")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="delivery guarantee of the detector"
    )

    # Consume loop.
    batch_max_messages: int = Field(5000, ge=1, description="messages per poll batch")
    poll_timeout_s: float = Field(
        0.05, gt=0, description="longest wait for a batch to fill: bounds the added latency"
    )
    slow_batch_s: float = Field(
        1.0, ge=0, description="a batch slower than this is logged with its phases (0: never)"
    )
    max_message_bytes: int = Field(65536, ge=256, description="larger scan messages go to DLQ")
    max_lateness_s: float = Field(
        7 * 86400, gt=0, description="scans older than the partition's event time by more go late"
    )
    commit_interval_s: float = Field(
        1.0,
        ge=0,
        description="checkpoint (changelog, offsets; in exactly-once the transaction) at most "
        "this often; a crash replays up to this much input (0: every batch)",
    )
    commit_retry_s: float = Field(
        120.0, gt=0, description="how long a failing commit is retried before the process exits"
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics and /health")
    health_stall_s: float = Field(
        120.0, gt=0, description="unhealthy when input waits but no batch finished for this long"
    )
    model_check_s: float = Field(
        5.0, gt=0, description="how often a detector looks for a new model"
    )
    idle_exit_s: float = Field(
        0.0,
        ge=0,
        description="exit after this long with partitions but without input (0: run forever)",
    )
    instance_id: str = Field(
        "",
        description="stable name of this detector (e.g. a pod name); exactly-once uses it so a "
        "restarted process fences its predecessor's open transaction at once (empty: the lowest "
        "free slot of the group on this host)",
    )
    session_timeout_s: float = Field(
        45.0, ge=6, le=300, description="a member silent this long leaves the group"
    )

    # Model and inference.
    model_dir: Path = Field(Path("models/current"), description="model directory to load")
    models_root: Path = Field(Path("models"), description="where versioned models are kept")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per process")
    lstm_hidden_size: int = Field(32, ge=4, description="LSTM hidden units")
    train_epochs_max: int = Field(30, ge=1, description="upper bound on training epochs")
    train_patience_epochs: int = Field(4, ge=1, description="early-stopping patience")
    train_batch_sequences: int = Field(256, ge=8, description="sequences per training batch")
    train_anomaly_share: float = Field(
        0.2, gt=0, lt=1, description="share of history EPCs given an injected anomaly"
    )
    validation_share: float = Field(0.25, gt=0, lt=1, description="EPCs held out for validation")
    train_max_epcs: int = Field(
        40_000,
        ge=100,
        description="EPCs the LSTM trains and validates on at most (sampled); the network is "
        "learned from all of history",
    )
    seed: int = Field(7, description="random seed for training and injection")

    # Windows and state.
    window_scans: int = Field(12, ge=2, description="scans kept per EPC window")
    state_max_epcs: int = Field(2_000_000, ge=1, description="tracked EPCs before eviction")
    state_ttl_s: float = Field(
        120 * 86400, gt=0, description="event-time age after which an EPC window expires"
    )

    # Rules and learned reference data.
    dup_window_s: float = Field(60.0, gt=0, description="two places within this are a clone")
    max_speed_kmh: float = Field(150.0, gt=0, description="fastest possible travel")
    hop_bound_quantile: float = Field(
        0.01, gt=0, lt=0.5, description="quantile of a route's hop times used for its bound"
    )
    hop_bound_factor: float = Field(
        0.5, gt=0, le=1, description="a hop faster than factor x quantile is a jump"
    )
    min_route_support: int = Field(3, ge=1, description="shipments before a route is known")
    min_route_share: float = Field(
        0.03, ge=0, le=1, description="share of an origin's shipments that makes a route known"
    )
    min_route_plausibility: float = Field(
        0.01,
        ge=0,
        le=1,
        description="a thinner route is still known if its origin's regular routes to that tier "
        "(at their median shipments, Poisson) look this thin at least this often; 1 turns it off",
    )
    min_route_bound_shipments: int = Field(
        20, ge=1, description="shipments before a route's own hop times set its bound"
    )
    min_prefix_support_epcs: int = Field(
        20, ge=1, description="distinct EPCs before a company prefix counts as registered"
    )
    min_prefix_support_share: float = Field(
        0.001, ge=0, lt=1, description="share of EPCs before a company prefix is registered"
    )
    registered_prefixes: list[str] = Field(
        default_factory=list, description="company prefixes always registered"
    )
    max_epc_age_days: int = Field(
        3650, ge=1, description="oldest manufacture date accepted at scan time"
    )
    site_timezone: str = Field("UTC", description="zone of event times without an offset")

    # Alerts.
    severity_high_confidence: float = Field(0.9, gt=0, le=1, description="HIGH at or above")
    severity_medium_confidence: float = Field(0.7, gt=0, le=1, description="MEDIUM at or above")

    # Drift.
    drift_delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence delta")
    drift_min_scans: int = Field(2000, ge=1, description="normal scans before drift may fire")
    drift_min_effect: float = Field(
        0.03, gt=0, lt=1, description="smallest change of a [0,1] statistic reported as drift"
    )
    drift_cooldown_s: float = Field(600.0, ge=0, description="one retrain request per cooldown")
    retrain_history_s: float = Field(
        7 * 86400, gt=0, description="recent scan history the retrainer reads, by message time"
    )
    retrain_margin: float = Field(
        0.01, ge=0, le=1, description="macro-F1 a candidate may lose and still be promoted"
    )
    topic_models: str = Field("model-updates", description="topic announcing model decisions")

    # Logs.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="level")
    log_format: Literal["json", "console", "auto"] = Field(
        "auto", description="json, console, or console on a terminal"
    )

    @field_validator("site_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value.upper() != "UTC":
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown time zone {value!r} (use e.g. UTC, Asia/Seoul)") from exc
        return value

    @model_validator(mode="after")
    def _severities_ordered(self) -> Settings:
        if self.severity_medium_confidence > self.severity_high_confidence:
            raise ValueError("severity_medium_confidence must not exceed severity_high_confidence")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("EPCWATCH_CONFIG_FILE")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(
                    f"EPCWATCH_CONFIG_FILE names {config_file}, which is not a readable file"
                )
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
