"""Orthanc Python plugin: tell screening-gateway when a study becomes stable.

Install: copy this file next to Orthanc's configuration, load libOrthancPython and point "PythonScript" at it
(see orthanc/orthanc.json and orthanc/README.md). Runs inside Orthanc's embedded Python, so it uses only the
standard library. A failed notification is logged and otherwise ignored: the gateway's reconciler reads
Orthanc's /changes feed and picks up every stable study it was not told about.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import orthanc

_CONFIG = json.loads(orthanc.GetConfiguration()).get("ScreeningGateway", {})
WEBHOOK_URL = _CONFIG.get("WebhookUrl", "")
SECRET = _CONFIG.get("Secret", "")
TIMEOUT = float(_CONFIG.get("Timeout", 10))


def _notify(study_id: str) -> None:
    request = urllib.request.Request(
        WEBHOOK_URL,
        data=json.dumps({"study": study_id}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-Gateway-Secret": SECRET},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            response.read()
    except Exception as exc:  # the reconciler catches up; never disturb Orthanc
        orthanc.LogWarning(f"screening-gateway: webhook for study {study_id} failed ({exc})")


def OnChange(change_type: int, level: int, resource_id: str) -> None:
    if change_type == orthanc.ChangeType.STABLE_STUDY and WEBHOOK_URL:
        # Orthanc calls this on its own thread: never block it on the network.
        threading.Thread(target=_notify, args=(resource_id,), daemon=True).start()


if not WEBHOOK_URL or not SECRET:
    orthanc.LogWarning("screening-gateway: ScreeningGateway.WebhookUrl/Secret not configured, plugin idle")
orthanc.RegisterOnChangeCallback(OnChange)
