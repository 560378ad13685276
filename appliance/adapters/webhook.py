# SPDX-License-Identifier: GPL-2.0-or-later
"""Alert messages to a webhook: one JSON POST (urllib). Its `text` field is what Slack's and Teams'
incoming webhooks and Matrix's hookshot show; the other fields (title, state, kind, subject, time,
appliance) are for receivers that sort alerts. The URL is the channel's secret: it is never in an error
or a log, only its redacted form."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from appliance.domain.alerts import Channel, Message
from appliance.errors import AlertDeliveryError

TIMEOUT = 30.0  # seconds
_MAX_REASON = 200


class WebhookSender:
    def send(self, channel: Channel, secret: str, message: Message) -> None:
        if not secret.startswith(("http://", "https://")):
            raise AlertDeliveryError(f"the webhook of {channel.name} has no http(s) URL")
        body = json.dumps(payload(message)).encode()
        request = urllib.request.Request(secret, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:  # noqa: S310 - http(s) checked above
                answer.read()
        except urllib.error.HTTPError as exc:
            reason = _reason(exc.read()) or exc.reason
            # not chained: urllib's exception holds the whole URL, which a traceback would show
            raise AlertDeliveryError(f"{channel.url_shown} refused: HTTP {exc.code} {reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise AlertDeliveryError(f"cannot reach {channel.url_shown}: {why}") from None


def payload(message: Message) -> dict[str, str]:
    return {
        "text": f"{message.title}\n{message.body}".rstrip("\n"),
        "title": message.title,
        "state": message.state,
        "kind": message.kind,
        "subject": message.subject,
        "time": message.time.isoformat(),
        "appliance": message.appliance,
    }


def _reason(raw: bytes) -> str:
    return " ".join(raw.decode(errors="replace").split())[:_MAX_REASON]
