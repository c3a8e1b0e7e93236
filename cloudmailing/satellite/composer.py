"""From a leased recipient to a ready-to-send message: template, personalization, DKIM.

Templates and signers are made once per mailing and reused for all its recipients. A recipient
whose message cannot be built fails alone, as GENERAL_ERROR.
"""

from __future__ import annotations

import base64
import email
import email.policy
import logging
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from cloudmailing.common.attachments import attachment_problem, media_type
from cloudmailing.common.clock import WallClock
from cloudmailing.common.statuses import GENERAL_ERROR
from cloudmailing.satellite.delivery import DeliveryJob
from cloudmailing.satellite.dkim_signer import DkimSigner
from cloudmailing.satellite.message_builder import MailingContent, MailingMessageTemplate
from cloudmailing.satellite.templates import PersonalizationError

log = logging.getLogger(__name__)


@dataclass
class PreparedMailing:
    mailing_id: int
    template: MailingMessageTemplate
    signer: DkimSigner | None
    testing: bool
    keep_content: bool = False  # backup_customized_emails: the master keeps each message sent


def prepare(content: dict[str, Any]) -> PreparedMailing:
    """Compile a mailing (as the master's ``mailing`` link method returns it)."""
    rfc822 = base64.b64decode(content.get("rfc822") or "") or None
    template = MailingMessageTemplate(MailingContent(
        mailing_id=int(content["id"]), mail_from=content["mail_from"], sender_name=content.get("sender_name") or "",
        subject=content.get("subject") or "", html=content.get("html") or "", plain=content.get("plain") or "",
        charset=content.get("charset") or "utf-8", tracking_url=content.get("tracking_url") or "", rfc822=rfc822),
        clock=WallClock())  # a compose worker runs no reactor: its Date headers read the system's time
    dkim = content.get("dkim") or {}
    signer = (DkimSigner(dkim["domain"], dkim["selector"], dkim["privkey"].encode())
              if dkim.get("enabled") else None)
    return PreparedMailing(int(content["id"]), template, signer, bool(content.get("testing")),
                           bool(content.get("backup_customized_emails")))


def compose(mailing: PreparedMailing, recipient: dict[str, Any]) -> DeliveryJob:
    """The signed message for one recipient; raises PersonalizationError for that one only."""
    built = mailing.template.build(recipient["id"], recipient["email"], recipient.get("contact") or {})
    data = built.data
    if recipient.get("attachments"):
        data = with_attachments(data, recipient["attachments"])
    if mailing.signer:
        data = mailing.signer.sign(data)
    return DeliveryJob(recipient_id=recipient["id"], domain=recipient["domain"], envelope_from=built.envelope_from,
                       recipient=built.recipient, data=data, mailing_id=str(mailing.mailing_id),
                       testing=mailing.testing, keep_content=mailing.keep_content)


# Headers read back are written out as they were built: refolding them would drop the quotes
# around a long display name (a From naming another address, signed as it is) and fail on a
# long SMTPUTF8 address.
_AS_BUILT = email.policy.SMTP.clone(refold_source="none")


def with_attachments(data: bytes, attachments: list[dict[str, Any]]) -> bytes:
    """The message with this recipient's own attachments added (a slower path, for them only)."""
    message = email.message_from_bytes(data, policy=_AS_BUILT)
    assert isinstance(message, EmailMessage)
    if message.get_content_type() != "multipart/mixed":
        message.make_mixed()
    for attachment in attachments:
        content = base64.b64decode(attachment["content"])
        if attachment_problem(attachment["content_type"], content):
            # Refused by the API (common/attachments.py); one stored before it was goes as its bytes.
            message.add_attachment(content, maintype="application", subtype="octet-stream",
                                   filename=attachment["filename"])
        elif media_type(attachment["content_type"])[0] == "message":  # message/rfc822 in 7-bit data
            attached = email.message_from_bytes(content, policy=_AS_BUILT)
            message.add_attachment(attached, cte="7bit", filename=attachment["filename"])
        else:
            maintype, _, subtype = attachment["content_type"].partition("/")
            message.add_attachment(content, maintype=maintype, subtype=subtype, filename=attachment["filename"])
    return message.as_bytes()


def build_failure(recipient_id: str, error: Exception) -> dict[str, Any]:
    reason = error.reason if isinstance(error, PersonalizationError) else f"message build failed: {error}"
    return {"recipient_id": recipient_id, "status": GENERAL_ERROR, "reply_code": None,
            "reply_enhanced_code": "", "reply_text": reason, "smtp_log": [], "mx_host": ""}
