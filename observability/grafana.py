"""Provisioning Grafana: the dashboards of ``observability.dashboards`` into a folder, through Grafana's HTTP API
(grafana-client). Idempotent: a push replaces the dashboards with the same uids."""

from __future__ import annotations

from typing import Any

from observability.dashboards import dashboards

FOLDER_UID = "anker"
FOLDER_TITLE = "Anker"


def push(url: str, token: str, verify: bool = True) -> list[str]:
    """Creates the Anker folder if needed and writes every dashboard into it; returns the dashboards' URLs."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(url=url, credential=token)
    api.client.verify = verify
    try:
        api.folder.get_folder(FOLDER_UID)
    except GrafanaClientError as error:
        if error.status_code != 404:
            raise
        api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
    urls = []
    for model in dashboards().values():
        answer: dict[str, Any] = api.dashboard.update_dashboard(
            {"dashboard": {**model, "id": None}, "folderUid": FOLDER_UID, "overwrite": True, "message": "anker"}
        )
        urls.append(f"{url.rstrip('/')}{answer.get('url', '')}")
    return urls
