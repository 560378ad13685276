# SPDX-License-Identifier: GPL-2.0-or-later
"""Alert messages by mail (smtplib): plain SMTP, STARTTLS when the channel asks for it, or TLS from the
first byte on port 465; a login when the channel has a user. Every refusal or failure to reach the
server is one AlertDeliveryError with the server's own one-line reason (the sender retries)."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from appliance.domain.alerts import Channel, Message
from appliance.errors import AlertDeliveryError

TIMEOUT = 30.0  # seconds: a server that does not answer in this time is tried again later


class MailSender:
    def send(self, channel: Channel, secret: str, message: Message) -> None:
        mail = _compose(channel, message)
        try:
            with _connect(channel) as smtp:
                if channel.starttls and not channel.implicit_tls:
                    smtp.starttls(context=ssl.create_default_context())
                if channel.user:
                    smtp.login(channel.user, secret)
                smtp.send_message(mail)
        except smtplib.SMTPResponseException as exc:
            raise AlertDeliveryError(f"{_server(channel)} refused: {exc.smtp_code} {_reason(exc.smtp_error)}") from exc
        except smtplib.SMTPRecipientsRefused as exc:
            refusals = "; ".join(f"{who}: {code} {_reason(why)}" for who, (code, why) in exc.recipients.items())
            raise AlertDeliveryError(f"{_server(channel)} refused the recipients: {refusals}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise AlertDeliveryError(f"cannot deliver through {_server(channel)}: {exc or type(exc).__name__}") from exc


def _connect(channel: Channel) -> smtplib.SMTP:
    if channel.implicit_tls:
        return smtplib.SMTP_SSL(channel.smtp_host, channel.smtp_port, timeout=TIMEOUT,
                                context=ssl.create_default_context())  # fmt: skip
    return smtplib.SMTP(channel.smtp_host, channel.smtp_port, timeout=TIMEOUT)


def _compose(channel: Channel, message: Message) -> EmailMessage:
    mail = EmailMessage()
    mail["Subject"] = message.title
    mail["From"] = channel.sender
    mail["To"] = ", ".join(channel.recipients)
    mail["Date"] = format_datetime(message.time)
    mail["Message-ID"] = make_msgid(domain=message.appliance or None)
    mail["X-Appliance-Alert"] = f"{message.state} {message.kind} {message.subject}".strip()
    mail.set_content(message.body)
    return mail


def _server(channel: Channel) -> str:
    return f"the mail server {channel.smtp_host}:{channel.smtp_port}"


def _reason(raw: bytes | str) -> str:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return " ".join(text.split()) or "(no reason given)"
