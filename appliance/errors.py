# SPDX-License-Identifier: GPL-2.0-or-later
"""Every failure a user can meet, as one tree with a message, a hint and an exit code.

The CLI boundary (`appliance.cli.main`) is the only place that turns these into a line on stderr
and an exit status; everything below raises them, always chaining the root cause (`raise ... from`).

    ApplianceError                       exit 2 unless a subclass says otherwise
     +-- ConfigError                     3   invalid option, name, policy or config file
     +-- HostNotFoundError               4   no such protected host
     +-- ChainError                      10
     |    +-- ChainLockedError           11  another job holds the host's lock
     |    +-- PointNotFoundError         12
     |    +-- ChainCorruptError          13  a point does not read back as recorded, or the catalog lacks its files
     +-- StoreFullError                  14  the appliance's disk has no room
     +-- DamagedFileError                15  a file under APPLIANCE_HOME is damaged or not the appliance's
     +-- RemoteError                     20
     |    +-- HostUnreachableError       21
     |    +-- AuthenticationError        22
     |    +-- HostKeyError               23  unknown or changed host key
     |    +-- ConnectionLostError        24  the connection broke mid-transfer
     |    |    +-- JobDeadlineError      28  the job went on past its deadline (slower than the host's min rate)
     |    +-- RemoteCommandError         25  the host side failed (python3 missing, hook failed, ...)
     |    +-- DiskAccessError            26  a disk path is missing or unreadable on the host
     |    +-- ProtocolViolationError     27  the host sent what the reader never sends, or a disk beyond its limit
     +-- ImageToolError                  30  qemu-img / qemu-storage-daemon failed
     +-- LabError                        40
 +-- HypervisorError                 50
 +-- FailoverError                   51
 +-- CloudError                      60  the cloud copy (S3)
      +-- CloudAccessError           61  wrong credentials, endpoint or bucket
      +-- CloudLockError             62  the bucket does not enforce Object Lock as asked
      +-- CloudObjectError           63  an object missing, or damaged (its name in the message)
      +-- CloudKeyError              64  a key file that is not this store's
      +-- CloudFullError             65  the bucket is full or its quota is reached
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_ERROR = 2
EXIT_SIGNAL_BASE = 128


class ApplianceError(Exception):
    """An expected failure: shown to the user as one line (plus a hint), never as a traceback."""

    exit_code: ClassVar[int] = EXIT_ERROR
    default_hint: ClassVar[str | None] = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class ConfigError(ApplianceError):
    exit_code = 3


class HostNotFoundError(ApplianceError):
    exit_code = 4
    default_hint = "`appliance host list` shows the protected hosts"


class ChainError(ApplianceError):
    exit_code = 10


class ChainLockedError(ChainError):
    exit_code = 11


class PointNotFoundError(ChainError):
    exit_code = 12
    default_hint = "`appliance points HOST` lists the recovery points"


class ChainCorruptError(ChainError):
    exit_code = 13


class StoreFullError(ApplianceError):
    exit_code = 14
    default_hint = "free space under APPLIANCE_HOME (or consolidate older points); the chain was left as it was"


class DamagedFileError(ApplianceError):
    """A record the appliance keeps (host, schedule, recovery VM, failback ...) does not read as one; the
    message names the file."""

    exit_code = 15
    default_hint = "restore the file from a copy, or remove it if what it recorded is no longer needed"


class RemoteError(ApplianceError):
    exit_code = 20


class HostUnreachableError(RemoteError):
    exit_code = 21


class AuthenticationError(RemoteError):
    exit_code = 22


class HostKeyError(RemoteError):
    exit_code = 23


class ConnectionLostError(RemoteError):
    exit_code = 24
    default_hint = "nothing was recorded; the next run starts the point again"


class RemoteCommandError(RemoteError):
    exit_code = 25


class DiskAccessError(RemoteError):
    exit_code = 26


class ProtocolViolationError(RemoteError):
    """The host answered with something the reader the appliance sent it never sends: a length, block or count
    outside the disk, bytes that are no record. Either something on the host writes into the session (a login
    script printing to stdout), or the host is not to be trusted. Also a disk larger than the host's limit."""

    exit_code = 27
    default_hint = "nothing was recorded; check the host (its login scripts, and whether it was tampered with)"


class JobDeadlineError(ConnectionLostError):
    """A job that kept the line alive but went slower, overall, than the host's minimum rate: it ends at its
    deadline so that one slow (or hostile) host never holds the daemon's other hosts."""

    exit_code = 28
    default_hint = "nothing was recorded; if the host is slow but sound, lower its `host set NAME --min-rate`"


class ImageToolError(ApplianceError):
    exit_code = 30


class LabError(ApplianceError):
    exit_code = 40


class HypervisorError(ApplianceError):
    exit_code = 50


class FailoverError(ApplianceError):
    exit_code = 51


class CloudError(ApplianceError):
    """The cloud copy: the bucket answered with an error, or holds what the appliance did not write."""

    exit_code = 60


class CloudAccessError(CloudError):
    exit_code = 61
    default_hint = "check the endpoint, the bucket's name and the credentials file (`cloud add` or `cloud attach`)"


class CloudLockError(CloudError):
    exit_code = 62
    default_hint = "create the bucket with Object Lock enabled (it cannot be turned on for a bucket's old objects)"


class CloudObjectError(CloudError):
    exit_code = 63
    default_hint = "`appliance cloud verify STORE --deep` names every missing or damaged object"


class CloudKeyError(CloudError):
    exit_code = 64
    default_hint = "use the key file `cloud key export` wrote for this bucket"


class CloudFullError(CloudError):
    exit_code = 65
    default_hint = "raise the bucket's quota or let the bucket's retention drop points; what was sent is kept"


class AlertError(ApplianceError):
    """An alert channel: bad settings, or a channel that is not there."""

    exit_code = 70


class AlertDeliveryError(AlertError):
    """A mail server or webhook refused a message or could not be reached (the message is retried)."""

    exit_code = 71


class UserError(ApplianceError):
    """The console's users and tokens: bad name, role or password, or no such user."""

    exit_code = 80


class WebError(ApplianceError):
    """The web console cannot start: address in use, certificate unreadable."""

    exit_code = 81
