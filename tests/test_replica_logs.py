"""A replica's log file outlives vLLM's start: vLLM applies its logging config with ``dictConfig``, which closes every
handler of the process, Serve's replica logger among them (deployments/server/vllm_start.py::serve_logs_kept)."""

from __future__ import annotations

import logging
import logging.config
import logging.handlers
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.server.vllm_start import SERVE_LOGGER, serve_logs_kept


@pytest.fixture
def replica_log(tmp_path: Path) -> Iterator[Path]:
    """Serve's replica logger as Serve sets it up: a memory handler in front of the log file."""
    path = tmp_path / "replica.log"
    logger = logging.getLogger(SERVE_LOGGER)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers = [logging.handlers.MemoryHandler(1, target=logging.FileHandler(path))]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield path
    for handler in logger.handlers:
        handler.close()
    logger.handlers, logger.level, logger.propagate = saved


def vllm_configures_logging() -> None:
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})


def test_without_the_guard_the_replicas_lines_are_lost(replica_log: Path) -> None:
    """What happened in every engine replica (the reason for the guard): lines held in memory, none written."""
    vllm_configures_logging()
    logging.getLogger(SERVE_LOGGER).info("usage request_id=after")
    assert "after" not in replica_log.read_text()


def test_the_replicas_lines_are_written_after_vllm_configured_logging(replica_log: Path) -> None:
    logger = logging.getLogger(SERVE_LOGGER)
    logger.info("usage request_id=before")
    with serve_logs_kept():
        vllm_configures_logging()
    logger.info("usage request_id=after")
    text = replica_log.read_text()
    assert "before" in text and "after" in text
    [handler] = [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    assert handler.buffer == []  # nothing held back
