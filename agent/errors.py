"""The agent's own exceptions.

    EdgeError
    ├── ConfigError              bad or unreadable configuration (exit 2)
    ├── UsageError               bad command line (exit 2)
    ├── DirectoryHeld            another agent holds buffer.path or agent.state_dir (exit 2)
    ├── StartupError             the agent cannot start: a directory it cannot use, a port in
    │                            use (one line; exit 2 if a fix is needed, 1 if a restart may do)
    ├── PersistError             an order could not be made durable (HTTP 503)
    │   └── BufferFullError      buffer.max_bytes reached or the disk is full (HTTP 507)
    ├── InvalidOrderError        an order that is not acceptable as sent (HTTP 400)
    ├── OrderFileError           an order file that cannot be taken as one (names the file)
    │   ├── UnreadableFile       cannot be opened or read (EACCES, EIO, dangling link): left alone
    │   └── CorruptRecordError   a buffer file that cannot be parsed (quarantined)
    │       ├── NotARegularFile  a FIFO, device, socket or directory: moved aside, never read
    │       └── TooLarge         over the order file cap (agent.spool.reading): quarantined
    ├── UpstreamError            the order center did not answer usefully
    │   ├── UpstreamUnavailable  nothing was sent: the order surely was not created
    │   │   └── DnsError         a cluster host did not resolve (NXDOMAIN, SERVFAIL, timeout)
    │   │       └── NoSuchHost   the name does not exist (NXDOMAIN): a typo or a missing record
    │   └── UpstreamAmbiguous    sent, but no answer: the order may have been created
    └── SmsError                 an SMS provider did not take a notice
        ├── SmsTransient         surely not sent (refused, 5xx, 429): retry with backoff
        │   └── SmsRateLimited   the provider throttles us: retry, but not at once
        ├── SmsRejected          refused for good (bad number, template, key): give up
        └── SmsAmbiguous         sent, but no answer: it may have gone out; never resent
    ReplicaError                 JetStream did not acknowledge a replica write (CONTRACT 11)
    └── ReplicaConflict          another order under this serial: node_id shared by two agents
    ConfigError
    └── ReplicaTooSmall          the stream exists with fewer replicas than configured (exit 2)

Errors of the libraries below are translated into these where the library is
called: aiohttp's in ``agent/upstream/http_errors.py`` (the lean client in
``agent/upstream/http1.py`` classifies its own the same way), OSError from the
buffer's files in ``agent/base/durable.py`` (``translate``) and, for opening and
reading order files, ``agent/spool/reading.py``, sqlite3's in
``agent/state/sqlite_db.py``, the SMS gateways' in ``agent/sms/providers.py``.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(EdgeError):
    """The configuration is invalid; the message names the key or file."""


class UsageError(EdgeError):
    """The command line is invalid."""


class DirectoryHeld(EdgeError):
    """Another process owns a directory this agent needs; the message names it and the holder."""


class StartupError(EdgeError):
    """The agent cannot start; the message names the path or value and what to do.

    ``exit_code`` 2: a fix is needed (a directory the agent's user cannot write), so
    systemd does not restart it (RestartPreventExitStatus=2); 1: a restart may help
    (the port is still held by a process on its way out).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PersistError(EdgeError):
    """An order could not be made durable; it must not be acknowledged."""


class BufferFullError(PersistError):
    """No room for another order: the caller must retry later."""


class OrderFileError(EdgeError):
    """An order file that cannot be taken as an order; the message names the file."""


class UnreadableFile(OrderFileError):
    """The file cannot be opened or read by us (EACCES, EIO, a link to nothing).

    It is left where it is and reported: it may be an order nobody else holds,
    and fixing its owner, mode or link makes the next run take it.
    """


class CorruptRecordError(OrderFileError):
    """A buffer file is not a valid record; it goes to rejected/."""


class NotARegularFile(CorruptRecordError):
    """A FIFO, device, socket, directory (or, where refused, a symlink) named like an
    order file: moved aside to rejected/ without ever being read."""


class TooLarge(CorruptRecordError):
    """Larger than any order file can be; quarantined without being read whole."""

    def __init__(self, message: str, size: int, cap: int) -> None:
        super().__init__(message)
        self.size = size
        self.cap = cap


class UpstreamError(EdgeError):
    """The order center gave no usable answer."""


class UpstreamUnavailable(UpstreamError, ConnectionError):
    """Nothing reached the center (refused, DNS, TLS): safe to try elsewhere."""


class DnsError(UpstreamUnavailable):
    """A cluster host could not be resolved; nothing was sent."""


class NoSuchHost(DnsError):
    """The cluster host does not exist in DNS (NXDOMAIN): a typo, or a record not made yet."""


class UpstreamAmbiguous(UpstreamError, TimeoutError):
    """The request may have reached the center: only the same cluster may be retried."""


class InvalidOrderError(EdgeError, ValueError):
    """An order that can never be accepted as sent (HTTP 400); names the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ReplicaError(EdgeError):
    """NATS JetStream did not acknowledge a write within replication.timeout_s (no quorum,
    no connection); the message says which record and why."""


class ReplicaConflict(ReplicaError):
    """The replica holds another order under this order's serial: two agents write as
    the same agent.node_id. Never overwritten; the message says which orders."""


class ReplicaTooSmall(ConfigError):
    """The replica stream exists with fewer replicas than replication.replicas asks for."""


class SmsError(EdgeError):
    """An SMS provider did not take a notice; the message names provider and reason."""


class SmsTransient(SmsError, ConnectionError):
    """The notice surely did not go out: safe to retry later."""


class SmsRateLimited(SmsTransient):
    """The provider throttles us (e.g. Aliyun isv.BUSINESS_LIMIT_CONTROL): retry after a pause."""


class SmsRejected(SmsError, ValueError):
    """The provider refused the notice for good: retrying cannot help."""


class SmsAmbiguous(SmsError, TimeoutError):
    """The request may have reached the provider: resending could send a second message."""
