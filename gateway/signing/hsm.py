"""The process's PKCS#11 module: one token, one login, a pool of sessions, cached key handles.

Facts this module is built around (measured; README, "The HSM"; domain brief §7):

- python-pkcs11 initialises the module with `C_Initialize(NULL)`. SoftHSM then turns its own
  locking off and two threads signing on separate sessions corrupt its heap. We re-initialise
  the module with `CKF_OS_LOCKING_OK` through ctypes before any session is opened.
- Login is per application: the first session logs in, later sessions inherit it, and closing
  a logged-in session logs everybody out. So one process-wide session holds the login, shared
  (reference-counted) by every `Hsm` on that token, and is closed last.
- Key objects belong to the session that found them: each pooled session caches its own handles.
- SoftHSM 2.6 has no CKM_ECDSA_SHA256: we hash in Python and sign with CKM_ECDSA when the token
  lacks the combined mechanism, then DER-encode r||s.
- python-pkcs11 takes the GIL back around each PKCS#11 call: `sign_batch` (the async pool's
  path) signs through `pkcs11_batch` instead, one call without the GIL for the whole batch.

A failure that means "the token is not there" (removed, module finalised, device error) marks the
pool broken and raises `TokenUnavailable`; the next call reconnects (at most every
`reconnect_interval` seconds) so the pool recovers without a restart once the token is back.
A PIN the token refuses on a reconnect is not offered again (HsmLoginError until a restart), and a
key deleted by another process is KeyNotFound, not a token gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import hmac
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from gateway.config import Settings
from gateway.signing.base import KeyInfo, KeySigner, PublicKey, raw_to_der_ecdsa
from gateway.signing.errors import (
    CertificateMismatch,
    HsmError,
    HsmLoginError,
    KeyExists,
    KeyNotFound,
    TokenUnavailable,
)
from gateway.signing.softhsm import is_softhsm, point_environment_at

T = TypeVar("T")

CKF_OS_LOCKING_OK = 0x00000002
MAX_LABEL = 64  # a certificate's CN may default to it (ub-common-name 64), a file is named after it
CERT_CACHE_SECONDS = 60.0
CKR_OK = 0
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


# Per module path: (epoch, SOFTHSM2_CONF) of our last initialisation. The module is one instance per
# process, so re-initialising it for one Hsm invalidates every other Hsm's sessions: they notice the
# new epoch and reconnect before their next call instead of failing it.
_module_epochs: dict[str, tuple[int, str | None]] = {}
_module_lock = threading.Lock()


def _initialise_module(module_path: str, *, force: bool) -> int:
    """Make sure the module runs with OS locking; returns its epoch. `force` re-initialises."""
    conf = os.environ.get("SOFTHSM2_CONF")
    with _module_lock:
        state = _module_epochs.get(module_path)
        if state is not None and not force and state[1] == conf:
            return state[0]
        pkcs11.lib(module_path)
        epoch = (state[0] if state else 0) + 1
        # Record first: even a failed C_Initialize leaves older sessions dead.
        _module_epochs[module_path] = (epoch, conf)
        _reinitialize_with_os_locking(module_path)
        return epoch


# (module, token label, epoch) -> [logged-in session, users]
_logins: dict[tuple[str, str, int], list[Any]] = {}


def _acquire_login(module_path: str, token: Any, epoch: int, pin: str) -> None:
    key = (module_path, token.label, epoch)
    with _module_lock:
        digest = hashlib.sha256(pin.encode()).digest()
        entry = _logins.get(key)
        if entry is not None:
            # The token would not ask again; we do, so a wrong PIN never rides on another login.
            if not hmac.compare_digest(entry[2], digest):
                raise pkcs11.exceptions.PinIncorrect()
            entry[1] += 1
            return
        try:
            session = token.open(user_pin=pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            session = None  # logged in by someone outside our bookkeeping; keep it that way
        _logins[key] = [session, 1, digest]


def _release_login(module_path: str, token_label: str, epoch: int) -> None:
    key = (module_path, token_label, epoch)
    with _module_lock:
        entry = _logins.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _logins[key]
        if entry[0] is not None and _module_epoch(module_path) == epoch:
            try:
                entry[0].close()  # logs out: the last user is gone
            except pkcs11.exceptions.PKCS11Error:
                pass


def _module_epoch(module_path: str) -> int:
    state = _module_epochs.get(module_path)
    return state[0] if state else 0


def _reinitialize_with_os_locking(module_path: str) -> None:
    """C_Finalize, then C_Initialize with CKF_OS_LOCKING_OK, on the module python-pkcs11 loaded.

    dlopen of the same path returns the same handle, so this acts on the very instance that
    python-pkcs11 uses; its own `initialized` flag stays true and it never re-initialises.
    """
    dll = ctypes.CDLL(module_path)
    finalize = dll.C_Finalize
    finalize.argtypes = [ctypes.c_void_p]
    finalize.restype = ctypes.c_ulong
    initialize = dll.C_Initialize
    initialize.argtypes = [ctypes.c_void_p]
    initialize.restype = ctypes.c_ulong
    rv = finalize(None)
    if rv not in (CKR_OK, CKR_CRYPTOKI_NOT_INITIALIZED):
        raise HsmError(f"C_Finalize failed: 0x{rv:x}")
    args = _InitArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
    rv = initialize(ctypes.byref(args))
    if rv != CKR_OK:
        raise TokenUnavailable(f"C_Initialize with OS locking failed: 0x{rv:x}")


# python-pkcs11 exceptions that mean the token or module is gone, as opposed to a bad request.
_DEVICE_FAILURES: tuple[type[Exception], ...] = (
    pkcs11.exceptions.TokenNotPresent,
    pkcs11.exceptions.TokenNotRecognised,
    pkcs11.exceptions.DeviceRemoved,
    pkcs11.exceptions.DeviceError,
    pkcs11.exceptions.DeviceMemory,
    pkcs11.exceptions.SessionHandleInvalid,
    pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.UserNotLoggedIn,
    pkcs11.exceptions.KeyHandleInvalid,
    pkcs11.exceptions.ObjectHandleInvalid,
    pkcs11.exceptions.FunctionFailed,
    pkcs11.exceptions.NoSuchToken,
    # An operation left active on a session makes every later call on it fail: reopen them all.
    pkcs11.exceptions.OperationActive,
)


# CK_RV codes the batch path can meet, as the exceptions python-pkcs11 raises for them.
_ERRORS_BY_RV: dict[int, type[pkcs11.exceptions.PKCS11Error]] = {
    0x05: pkcs11.exceptions.GeneralError,
    0x06: pkcs11.exceptions.FunctionFailed,
    0x20: pkcs11.exceptions.DataInvalid,
    0x21: pkcs11.exceptions.DataLenRange,
    0x30: pkcs11.exceptions.DeviceError,
    0x31: pkcs11.exceptions.DeviceMemory,
    0x32: pkcs11.exceptions.DeviceRemoved,
    0x60: pkcs11.exceptions.KeyHandleInvalid,
    0x63: pkcs11.exceptions.KeyTypeInconsistent,
    0x70: pkcs11.exceptions.MechanismInvalid,
    0x82: pkcs11.exceptions.ObjectHandleInvalid,
    0x90: pkcs11.exceptions.OperationActive,
    0xB0: pkcs11.exceptions.SessionClosed,
    0xB3: pkcs11.exceptions.SessionHandleInvalid,
    0xE0: pkcs11.exceptions.TokenNotPresent,
    0xE1: pkcs11.exceptions.TokenNotRecognised,
    0x101: pkcs11.exceptions.UserNotLoggedIn,
}


def _error_of(rv: int) -> pkcs11.exceptions.PKCS11Error:
    cls = _ERRORS_BY_RV.get(rv)
    return cls() if cls else pkcs11.exceptions.PKCS11Error(f"CK_RV 0x{rv:x}")


_batch_signers: dict[str, Any] = {}
_batch_signers_lock = threading.Lock()


def _batch_signer(module_path: str) -> Any:
    """The module's `BatchSigner`, imported on first use: one-shot commands never load Numba."""
    with _batch_signers_lock:
        signer = _batch_signers.get(module_path)
        if signer is None:
            from gateway.signing.pkcs11_batch import BatchSigner

            signer = _batch_signers[module_path] = BatchSigner(module_path)
        return signer


# A key handle the token no longer knows: its object was deleted, or the token went away.
_STALE_HANDLE = (pkcs11.exceptions.KeyHandleInvalid, pkcs11.exceptions.ObjectHandleInvalid)
_STALE_HANDLE_RVS = (0x60, 0x82)


def _is_device_failure(exc: BaseException) -> bool:
    if isinstance(exc, _DEVICE_FAILURES):
        return True
    # CKR_CRYPTOKI_NOT_INITIALIZED has no class of its own: python-pkcs11 says "(not initialized)",
    # the batch path "CK_RV 0x190".
    text = str(exc).lower()
    return isinstance(exc, pkcs11.exceptions.PKCS11Error) and ("0x190" in text or "not initialized" in text)


@dataclass
class _PooledSession:
    session: Any
    generation: int
    # label -> (private key, key type, its CKA_ID)
    keys: dict[str, tuple[Any, str, bytes]] = field(default_factory=dict)


@dataclass
class _Connection:
    """Everything that is only valid for one initialisation of the module."""

    generation: int
    epoch: int  # the module initialisation these sessions belong to
    token: Any
    admin: Any  # read-write session for management operations
    pool: queue.SimpleQueue[_PooledSession]
    sessions: list[_PooledSession]
    has_ecdsa_sha256: bool


@contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock between processes (none without a path, or where it cannot be made)."""
    fd = None
    if path is not None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


SOFTHSM_TOKEN_RETRIES = (0.02, 0.05, 0.1, 0.2)
"""Pauses (s) before looking again for a SoftHSM token that seemed absent (Hsm._find_token)."""


def _drop_incomplete(session: Any, labels: list[str]) -> list[str]:
    """SoftHSM makes the public half of a pair first, then an empty private key object it fills
    in: a process killed inside C_GenerateKeyPair leaves the label with a public key and no
    private key, and a private key with neither label nor key material. The public key was taken
    for the whole key (certified, then storing its certificate failed, for good) and the empty
    one could be the key /readyz probes (503 for good). Only such objects go: a public key of
    `labels` whose label has no private key, and key objects with neither label nor key
    material, which nothing can use. Returns the labels freed."""
    dropped = []
    for label in labels:
        if list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})):
            continue
        strays = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}))
        for stray in strays:
            stray.destroy()
        if strays:
            dropped.append(label)
    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for obj in list(session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: ""})):
            if _no_key_material(obj):
                obj.destroy()
    return dropped


def _no_key_material(obj: Any) -> bool:
    try:
        attribute = Attribute.EC_PARAMS if obj[Attribute.KEY_TYPE] == KeyType.EC else Attribute.MODULUS
        return not bytes(obj[attribute])
    except pkcs11.exceptions.PKCS11Error:  # not readable here: take the key for whole
        return False


class Hsm:
    """One PKCS#11 token for the whole process, safe to use from many threads at once."""

    def __init__(self, module: str, token_label: str, user_pin: str, *, sessions: int = 0,
                 reconnect_interval: float = 0.5, acquire_timeout: float = 30.0) -> None:
        self.module = module
        self.token_label = token_label
        self._pin = user_pin
        self.size = sessions if sessions > 0 else (os.cpu_count() or 2)
        self.reconnect_interval = reconnect_interval
        self.acquire_timeout = acquire_timeout
        self._lock = threading.Condition()
        self._active = 0  # operations holding a session
        self._idle_waiters = 0  # threads waiting for _active to reach 0
        self._conn: _Connection | None = None
        self._generation = 0
        self._last_attempt = 0.0
        self._last_error: str | None = None
        self._closed = False
        # Why the token refused our PIN on a reconnect. The configured PIN does not change while
        # we run, so it is never offered again: a token counts failed logins and locks the user
        # PIN after a few (real HSMs; SoftHSM only flags "count low"), and a retry every
        # reconnect_interval would get there within seconds. Fixed by a restart.
        self._login_refused: str | None = None
        # label -> (type, public key, when read, the private key's CKA_ID)
        self._pubkeys: dict[str, tuple[str, PublicKey, float, bytes | None]] = {}
        # Labels found (key, certificate) on this connection. A software token whose files went
        # away answers lookups with "not found", not with a device error: a label it knew that
        # now misses is taken for the token gone, and the pool reconnects before believing it.
        self._seen: set[tuple[str, str]] = set()  # (what, label)
        # label -> (certificate, when read): re-read after CERT_CACHE_SECONDS, so a certificate
        # renewed by another process (`gateway keys import-cert`) is used without a restart.
        self._certs: dict[str, tuple[x509.Certificate | None, float]] = {}
        # Held while a key is generated, so that processes of one home never both pass the
        # "label free" check (set by `open`: a file in the home).
        self.lock_path: Path | None = None

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def open(cls, settings: Settings, *, sessions: int | None = None) -> Hsm:
        """Open the configured token and log in. Raises TokenUnavailable if it is not there."""
        point_environment_at(settings)
        hsm = cls(settings.hsm.module, settings.hsm.token_label, settings.hsm.user_pin,
                  sessions=settings.hsm.sessions if sessions is None else sessions)
        hsm.lock_path = settings.home / ".keys.lock"
        with hsm._lock:
            hsm._connect_locked()
        return hsm

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wait_idle_locked(timeout=10.0)
            self._disconnect_locked()
            self._lock.notify_all()

    def __enter__(self) -> Hsm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def available(self) -> bool:
        return self._conn is not None

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def _find_token(self, force: bool) -> tuple[int, Any]:
        """The module's epoch and the token. SoftHSM reads its token files when initialised; one
        read while another process writes them (a login updates the token's flags, a key
        generation adds objects) shows no token, or fails with CKR_GENERAL_ERROR. Looked for
        again after a short pause, initialised anew: one of two commands started together
        failed with hsm_unavailable (2 runs in 10 of test_two_processes_generating_...)."""
        pauses = SOFTHSM_TOKEN_RETRIES if self._is_softhsm else ()
        for attempt in range(len(pauses) + 1):
            epoch = _initialise_module(self.module, force=force or attempt > 0)
            try:
                return epoch, pkcs11.lib(self.module).get_token(token_label=self.token_label)
            except (pkcs11.exceptions.NoSuchToken, pkcs11.exceptions.GeneralError) as exc:
                if attempt < len(pauses):
                    time.sleep(pauses[attempt])
                elif isinstance(exc, pkcs11.exceptions.NoSuchToken):
                    raise TokenUnavailable(f"token '{self.token_label}' not present in {self.module}") from exc
                else:
                    raise
            except pkcs11.exceptions.MultipleTokensReturned as exc:
                raise TokenUnavailable(f"several tokens labelled '{self.token_label}' in {self.module}") from exc
        raise AssertionError("unreachable")

    def _connect_locked(self, *, force: bool = False) -> None:
        self._last_attempt = time.monotonic()
        logged_in: tuple[str, int] | None = None  # (token label, epoch) of a login we hold
        opened: list[Any] = []  # sessions opened so far, closed again if we fail half-way
        try:
            epoch, token = self._find_token(force)
            pauses = SOFTHSM_TOKEN_RETRIES if self._is_softhsm else ()
            for attempt in range(len(pauses) + 1):
                try:
                    _acquire_login(self.module, token, epoch, self._pin)
                    break
                except (pkcs11.exceptions.PinIncorrect, pkcs11.exceptions.PinLocked,
                        pkcs11.exceptions.PinExpired, pkcs11.exceptions.PinInvalid) as exc:
                    self._login_refused = (f"login to token '{self.token_label}' refused: {type(exc).__name__}; "
                                           "not tried again until the gateway is restarted with the right PIN")
                    raise HsmLoginError(self._login_refused) from exc
                except pkcs11.exceptions.GeneralError:
                    # SoftHSM's login reads the token files too: one read while another process
                    # writes them fails as _find_token's lookup can (test_two_processes_generating_
                    # ... failed so, about 1 run in 10). Found again, initialised anew.
                    if attempt == len(pauses):
                        raise
                    time.sleep(pauses[attempt])
                    epoch, token = self._find_token(True)
            logged_in = (token.label, epoch)
            admin = token.open(rw=True)  # inherits the application's login
            opened.append(admin)
            mechanisms = set(token.slot.get_mechanisms())
            had_keys = bool(list(admin.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})))
            pool: queue.SimpleQueue[_PooledSession] = queue.LifoQueue()
            sessions = []
            for _ in range(self.size):
                pooled = _PooledSession(token.open(), self._generation + 1)
                opened.append(pooled.session)
                sessions.append(pooled)
                pool.put(pooled)
        except BaseException as exc:
            # Nothing half-open stays behind: a failed connect holds no session and no login
            # reference (a leaked reference would keep the token logged in after close()).
            for session in opened:
                with contextlib.suppress(Exception):
                    session.close()
            if logged_in is not None:
                _release_login(self.module, logged_in[0], logged_in[1])
            if isinstance(exc, HsmError):
                self._last_error = str(exc)
                raise
            if isinstance(exc, (pkcs11.exceptions.PKCS11Error, OSError)):
                self._last_error = f"{type(exc).__name__}: {exc}"
                raise TokenUnavailable(f"HSM module {self.module} unusable: {self._last_error}") from exc
            raise
        self._generation += 1
        self._keys_seen_generation = self._generation if had_keys else -1
        self._conn = _Connection(self._generation, epoch, token, admin, pool, sessions,
                                 Mechanism.ECDSA_SHA256 in mechanisms)
        self._last_error = None
        self._lock.notify_all()

    def _disconnect_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.epoch != _module_epoch(self.module):
            # The module was re-initialised under us: these handles are dead, and closing them
            # could close a newer session that reuses the same handle number.
            _release_login(self.module, self.token_label, conn.epoch)
            return
        for pooled in conn.sessions:
            try:
                pooled.session.close()
            except Exception:  # noqa: BLE001 - a dead module cannot close cleanly; nothing to save
                pass
        try:
            conn.admin.close()
        except Exception:  # noqa: BLE001
            pass
        _release_login(self.module, self.token_label, conn.epoch)

    def _wait_idle_locked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._idle_waiters += 1
        try:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
        finally:
            self._idle_waiters -= 1

    def _mark_broken(self, generation: int, exc: BaseException) -> None:
        """Remember that this generation of sessions is dead; the next borrower reconnects."""
        with self._lock:
            self._last_error = f"{type(exc).__name__}: {exc}"
            if self._conn is not None and self._conn.generation == generation:
                self._broken_generation = generation

    # ----------------------------------------------------------------- borrowing
    _broken_generation = -1

    def _ensure_connected_locked(self) -> _Connection:
        # A loop, because waiting for idle releases the lock: another thread may reconnect
        # meanwhile, and then we must use its connection instead of tearing it down again
        # (and, worse, re-initialising the module under borrowers of the new sessions).
        while True:
            if self._closed:
                raise TokenUnavailable("HSM pool is closed")
            if self._login_refused is not None:
                raise HsmLoginError(self._login_refused)
            conn = self._conn
            healthy = conn is not None and conn.generation != self._broken_generation
            if healthy and conn.epoch == _module_epoch(self.module):
                return conn
            if not healthy and time.monotonic() - self._last_attempt < self.reconnect_interval:
                raise TokenUnavailable(f"HSM unavailable: {self._last_error or 'not connected'}")
            # Wait for borrowers of the old sessions, then start over. A healthy connection on
            # an old epoch means someone else in this process re-initialised the module: our
            # sessions are gone, the token probably is not, so reopen without re-initialising.
            self._wait_idle_locked(timeout=self.acquire_timeout)
            if self._conn is not conn or self._closed:
                continue
            if self._active:
                raise TokenUnavailable("HSM reconnect waits for operations still running")
            self._disconnect_locked()
            self._pubkeys.clear()
            self._certs.clear()
            self._seen.clear()
            self._connect_locked(force=not healthy)
            assert self._conn is not None
            return self._conn

    @contextmanager
    def _session(self) -> Iterator[tuple[_Connection, _PooledSession]]:
        with self._lock:
            conn = self._ensure_connected_locked()
            self._active += 1
        try:
            try:
                pooled = conn.pool.get(timeout=self.acquire_timeout)
            except queue.Empty as exc:
                raise TokenUnavailable("no HSM session free in time") from exc
            try:
                yield conn, pooled
            except pkcs11.exceptions.PKCS11Error as exc:
                if _is_device_failure(exc):
                    self._mark_broken(conn.generation, exc)
                    raise TokenUnavailable(f"HSM failed: {type(exc).__name__}") from exc
                raise HsmError(f"HSM refused: {type(exc).__name__}: {exc}") from exc
            finally:
                conn.pool.put(pooled)
        finally:
            with self._lock:
                self._active -= 1
                if self._idle_waiters:  # only a reconnect or close waits for borrowers to return
                    self._lock.notify_all()

    def _admin(self, op: Callable[[Any, _Connection], T]) -> T:
        """Run a management operation on the logged-in read-write session."""
        with self._session() as (conn, _pooled), self._admin_lock:
            return op(conn.admin, conn)

    _admin_lock = threading.Lock()

    # ----------------------------------------------------------------- signing
    def sign(self, label: str, data: bytes, *, key_id: bytes | None = None) -> bytes:
        """SHA-256 over `data`, signed with the key `label` (thread-safe, blocking).

        RSA: PKCS#1 v1.5 signature. P-256: DER-encoded ECDSA signature. With `key_id`, only the
        key of that CKA_ID signs: KeyNotFound if the label now names another key.
        """
        with self._session() as (conn, pooled):
            return self._sign_on(conn, pooled, label, data, key_id)

    def sign_batch(self, jobs: list[tuple[str, bytes]]) -> list[bytes | HsmError]:
        """Sign several (label, data) on one borrowed session; one result or error per job.

        The signatures are made in one call that holds no GIL (`pkcs11_batch`): this is what
        lets a busy worker keep up with a fast key (P-256) while the event loop runs.
        """
        results: list[bytes | HsmError | None] = [None] * len(jobs)
        with self._session() as (conn, pooled):
            todo: list[tuple[int, str]] = []  # (job, key type) of what goes to the token
            items: list[tuple[int, int, bytes]] = []  # (key handle, mechanism, message)
            for i, (label, data) in enumerate(jobs):
                try:
                    key, key_type = self._key_on(pooled, label)
                except HsmError as exc:
                    results[i] = exc
                    continue
                except pkcs11.exceptions.PKCS11Error as exc:  # looking the key up failed
                    results[i] = failure = self._failure(conn, exc)
                    if isinstance(failure, TokenUnavailable):  # the session is dead: sign nothing
                        results = [failure if r is None else r for r in results]
                        todo, items = [], []
                        break
                    continue
                mechanism, message = self._mechanism_for(conn, key_type, data)
                todo.append((i, key_type))
                items.append((key.handle, mechanism, message))
            signed = _batch_signer(self.module).sign(pooled.session.handle, items) if items else []
            for (i, key_type), value in zip(todo, signed):
                if isinstance(value, bytes):
                    results[i] = raw_to_der_ecdsa(value) if key_type == "p256" else value
                elif value in _STALE_HANDLE_RVS:  # handled one by one below
                    pooled.keys.pop(jobs[i][0], None)
                else:
                    results[i] = self._failure(conn, _error_of(value))
            for i, (label, data) in enumerate(jobs):
                if results[i] is not None:
                    continue
                # A cached key the token no longer knows (or a job not attempted after one):
                # signed alone, the key looked up again (see _sign_on).
                try:
                    results[i] = self._sign_on(conn, pooled, label, data)
                except HsmError as exc:
                    results[i] = exc
                except pkcs11.exceptions.PKCS11Error as exc:
                    results[i] = self._failure(conn, exc)
                if isinstance(results[i], TokenUnavailable):  # the token is gone: sign nothing more
                    results = [results[i] if r is None else r for r in results]
                    break
        return cast(list[bytes | HsmError], results)  # every job has its result by now

    def _failure(self, conn: _Connection, exc: pkcs11.exceptions.PKCS11Error) -> HsmError:
        """The error one job gets: TokenUnavailable (and the pool marked broken) when the token
        or its sessions are gone, else the token's refusal of that request."""
        if _is_device_failure(exc):
            self._mark_broken(conn.generation, exc)
            return TokenUnavailable(f"HSM failed: {type(exc).__name__}")
        return HsmError(f"HSM refused: {type(exc).__name__}: {exc}")

    def warm_up_batches(self) -> None:
        """Load the batch-signing loop now (worker start) instead of on the first request."""
        _batch_signer(self.module).warm_up()

    def _key_on(self, pooled: _PooledSession, label: str, key_id: bytes | None = None) -> tuple[Any, str]:
        """The session's handle of the private key `label` (of CKA_ID `key_id` when given)."""
        entry = pooled.keys.get(label)
        if entry is None or (key_id is not None and entry[2] != key_id):
            try:
                entry = self._find_private(pooled.session, label)
            except KeyNotFound:
                self._missing(pooled.generation, "key", label, pooled.session)
                self._forget(label)
                raise
            pooled.keys[label] = entry
            self._seen.add(("key", label))
            cached = self._pubkeys.get(label)
            if cached is not None and cached[3] != entry[2]:  # generated again since it was read
                self._forget(label)
        if key_id is not None and entry[2] != key_id:
            # Deleted and generated again by another process since the signer was made: the new
            # key's signature would not match the signer's public key and certificate.
            raise KeyNotFound(f"the key labelled '{label}' was replaced on the token after its signer "
                              "was made; look the signer up again")
        return entry[0], entry[1]

    def _forget(self, label: str) -> None:
        """Drop what is cached of `label`'s public key and certificate: the key changed."""
        self._pubkeys.pop(label, None)
        self._certs.pop(label, None)

    _keys_seen_generation = -1  # the connection whose token held private keys

    def _missing(self, generation: int, what: str, label: str, session: Any) -> None:
        """A lookup of `label` found nothing. If this connection found it before, or the token
        held keys when connected, and the token shows no private key now, the token is taken for
        gone (TokenUnavailable, pool marked broken): SoftHSM keeps answering "nothing" from its view
        of a token whose files went away, even once they are back, until the module is
        initialised again. A token that still shows keys answers: that object was deleted
        (another process, `softhsm2-util`), and the caller's KeyNotFound stands."""
        known = (what, label) in self._seen or self._keys_seen_generation == generation
        if not known or _any_private_key(session):
            self._seen.discard((what, label))
            return
        exc = TokenUnavailable(f"the {what} '{label}' no longer answers and the token shows no key: reconnecting")
        self._mark_broken(generation, exc)
        raise exc

    @staticmethod
    def _mechanism_for(conn: _Connection, key_type: str, data: bytes) -> tuple[int, bytes]:
        """The mechanism and the message that make a SHA-256 signature of `data` with this key."""
        if key_type == "rsa2048":
            return Mechanism.SHA256_RSA_PKCS, data
        if conn.has_ecdsa_sha256:
            return Mechanism.ECDSA_SHA256, data
        return Mechanism.ECDSA, hashlib.sha256(data).digest()

    def _sign_on(self, conn: _Connection, pooled: _PooledSession, label: str, data: bytes,
                 key_id: bytes | None = None) -> bytes:
        key, key_type = self._key_on(pooled, label, key_id)
        mechanism, message = self._mechanism_for(conn, key_type, data)
        try:
            raw = key.sign(message, mechanism=mechanism)
        except _STALE_HANDLE:
            # The cached handle's object is gone: the key was deleted (maybe generated again) by
            # another process, or the token went away. Looked up again, `_missing` tells which.
            pooled.keys.pop(label, None)
            key, key_type = self._key_on(pooled, label, key_id)
            mechanism, message = self._mechanism_for(conn, key_type, data)
            raw = key.sign(message, mechanism=mechanism)
        return raw_to_der_ecdsa(raw) if key_type == "p256" else raw

    @staticmethod
    def _find_private(session: Any, label: str) -> tuple[Any, str, bytes]:
        try:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        except pkcs11.exceptions.NoSuchKey as exc:
            raise KeyNotFound(f"no private key labelled '{label}' on the token") from exc
        except pkcs11.exceptions.MultipleObjectsReturned as exc:
            raise HsmError(f"several private keys labelled '{label}'", code="key_ambiguous") from exc
        return key, _key_type_of(key), bytes(key.id or b"")

    def signer(self, label: str) -> KeySigner:
        """A KeySigner for `label`, with its certificate when one is stored."""
        key_type, public, key_id = self._public(label)
        cert = self.certificate(label)
        # Bound to this key, not to whatever the label names later: a key deleted and generated
        # again under the label (another process) must not sign under this public key and
        # certificate (a signature nobody could verify).
        return KeySigner(label=label, key_type=key_type, public_key=public, certificate=cert,
                         _sign=lambda data: self.sign(label, data, key_id=key_id))

    # ----------------------------------------------------------------- keys
    def generate_keypair(self, label: str, key_type: str) -> PublicKey:
        """Generate a key pair inside the token: private half sensitive and never extractable."""
        if key_type not in ("rsa2048", "p256"):
            raise HsmError(f"unsupported key type {key_type!r}", code="key_type_unsupported")
        if not valid_label(label):
            raise HsmError(f"label {label!r} is not 1 to {MAX_LABEL} printable ASCII characters "
                           "(no '/', no leading '.')", code="label_invalid")

        def op(session: Any, _conn: _Connection) -> None:
            if self._is_softhsm:  # what a generation cut short left would hold the label for good
                _drop_incomplete(session, [label])
            # Any object of that label, not only a private key: a public key or certificate left
            # behind would pair with the new key (two public keys: the label unusable for good).
            if list(session.get_objects({Attribute.LABEL: label})):
                raise KeyExists(f"a key or certificate labelled '{label}' already exists")
            key_id = hashlib.sha1(os.urandom(16) + label.encode()).digest()
            # A signing key signs and does nothing else: python-pkcs11's defaults would also let
            # an RSA key decrypt and unwrap, and an EC key derive (key separation, and the
            # nonRepudiation use its certificate states).
            private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                       Attribute.PRIVATE: True, Attribute.TOKEN: True, Attribute.DECRYPT: False,
                       Attribute.UNWRAP: False, Attribute.DERIVE: False}
            public = {Attribute.VERIFY: True, Attribute.TOKEN: True}
            usage = MechanismFlag.SIGN | MechanismFlag.VERIFY
            if key_type == "rsa2048":
                session.generate_keypair(KeyType.RSA, 2048, label=label, id=key_id, store=True,
                                         capabilities=usage, public_template=public,
                                         private_template=private)
            else:
                params = session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
                params.generate_keypair(label=label, id=key_id, store=True, capabilities=usage,
                                        public_template=public, private_template=private)

        # Two commands on one home: one generates, the other finds the label taken. (Processes on
        # other hosts sharing a network HSM are not covered: enrolment there is one operator's.)
        with _file_lock(self.lock_path):
            self._admin(op)
        self._pubkeys.pop(label, None)
        self._certs.pop(label, None)
        if self._conn is not None:
            self._keys_seen_generation = self._conn.generation
        return self.public_key(label)

    @property
    def _is_softhsm(self) -> bool:
        return is_softhsm(self.module)

    def drop_incomplete_keys(self, labels: Iterable[str]) -> list[str]:
        """Destroy what a key generation cut short left on a SoftHSM token; returns the labels
        freed (see `_drop_incomplete`). Another module's token is managed with its own tools."""
        wanted = list(labels)
        if not self._is_softhsm:
            return []
        # Under the lock generate_keypair holds: a pair being generated right now is no stray.
        with _file_lock(self.lock_path):
            dropped = self._admin(lambda session, _conn: _drop_incomplete(session, wanted))
        for label in dropped:
            self._pubkeys.pop(label, None)
        return dropped

    def public_key(self, label: str) -> PublicKey:
        return self._public(label)[1]

    def _public(self, label: str) -> tuple[str, PublicKey, bytes | None]:
        """Type, public key and the private key's CKA_ID (None without a private key), read
        together. Kept as long as a certificate: a key deleted and generated again under its
        label (by another process) is seen within that time, or at its first signature."""
        cached = self._pubkeys.get(label)
        if cached is not None and time.monotonic() - cached[2] < CERT_CACHE_SECONDS:
            return cached[0], cached[1], cached[3]

        def op(session: Any, conn: _Connection) -> tuple[str, PublicKey, bytes | None]:
            try:
                pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
            except pkcs11.exceptions.NoSuchKey as exc:
                self._missing(conn.generation, "public key", label, session)
                raise KeyNotFound(f"no key labelled '{label}' on the token") from exc
            except pkcs11.exceptions.MultipleObjectsReturned as exc:
                raise HsmError(f"several public keys labelled '{label}'", code="key_ambiguous") from exc
            privates = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
            key_id = bytes(privates[0].id or b"") if len(privates) == 1 else None
            return _key_type_of(pub), _to_cryptography(pub), key_id

        key_type, public, key_id = self._admin(op)
        self._pubkeys[label] = (key_type, public, time.monotonic(), key_id)
        self._seen.add(("public key", label))
        return key_type, public, key_id

    def list_keys(self) -> list[KeyInfo]:
        def op(session: Any, conn: _Connection) -> list[KeyInfo]:
            certs = {}
            for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}):
                certs[obj[Attribute.LABEL]] = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
            infos = []
            for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                label = key.label
                cert = certs.get(label)
                infos.append(KeyInfo(
                    label=label, key_type=_key_type_of(key), key_id=bytes(key.id or b"").hex(),
                    has_certificate=cert is not None,
                    subject=cert.subject.rfc4514_string() if cert else None,
                    not_after=cert.not_valid_after_utc.isoformat() if cert else None))
            if not infos:  # an empty token that had keys on this connection: gone, not empty
                for what, label in list(self._seen):
                    self._missing(conn.generation, what, label, session)
            return sorted(infos, key=lambda k: k.label)

        return self._admin(op)

    def key_protection(self, label: str) -> dict[str, bool]:
        """The private key's protection and usage attributes, as the token reports them."""

        def op(session: Any, _conn: _Connection) -> dict[str, bool]:
            try:
                key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
            except pkcs11.exceptions.NoSuchKey as exc:
                raise KeyNotFound(f"no private key labelled '{label}' on the token") from exc
            return {name: bool(key[attr]) for name, attr in (
                ("sensitive", Attribute.SENSITIVE), ("extractable", Attribute.EXTRACTABLE),
                ("always_sensitive", Attribute.ALWAYS_SENSITIVE),
                ("never_extractable", Attribute.NEVER_EXTRACTABLE), ("local", Attribute.LOCAL),
                ("decrypt", Attribute.DECRYPT), ("unwrap", Attribute.UNWRAP),
                ("derive", Attribute.DERIVE))}

        return self._admin(op)

    # ----------------------------------------------------------------- certificates
    def store_certificate(self, label: str, cert: x509.Certificate) -> None:
        """Store the certificate on the token next to its key (replacing an older one)."""
        public = self.public_key(label)
        if _spki(cert.public_key()) != _spki(public):
            raise CertificateMismatch(f"certificate for '{label}' does not carry that key's public key")

        def op(session: Any, _conn: _Connection) -> None:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
            older = list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}))
            # The new certificate first, the old ones after: a failure leaves the key with a
            # certificate, never with none.
            session.create_object({
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.LABEL: label,
                Attribute.ID: key.id,
                Attribute.SUBJECT: cert.subject.public_bytes(),
                Attribute.ISSUER: cert.issuer.public_bytes(),
                Attribute.SERIAL_NUMBER: cert.serial_number.to_bytes(20, "big").lstrip(b"\0") or b"\0",
                Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
            })
            for old in older:
                old.destroy()

        self._admin(op)
        self._certs[label] = (cert, time.monotonic())
        self._seen.add(("certificate", label))

    def certificate(self, label: str) -> x509.Certificate | None:
        cached = self._certs.get(label)
        if cached is not None and time.monotonic() - cached[1] < CERT_CACHE_SECONDS:
            return cached[0]

        def op(session: Any, conn: _Connection) -> x509.Certificate | None:
            found = list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}))
            if not found:
                self._missing(conn.generation, "certificate", label, session)
                return None
            return x509.load_der_x509_certificate(bytes(found[0][Attribute.VALUE]))

        cert = self._admin(op)
        self._certs[label] = (cert, time.monotonic())
        if cert is not None:
            self._seen.add(("certificate", label))
        return cert

    # ----------------------------------------------------------------- health
    def probe(self, label: str) -> None:
        """A real signature, checked with the public key: what readiness means."""
        signer = self.signer(label)
        payload = b"readiness probe " + os.urandom(8)
        signer.verify(self.sign(label, payload), payload)


def _any_private_key(session: Any) -> bool:
    """Whether the token shows a private key: the first one found ends the search."""
    search = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
    try:
        return next(search, None) is not None
    finally:
        search.close()  # C_FindObjectsFinal now, so the session can search again


def valid_label(label: str) -> bool:
    """A key label: 1 to MAX_LABEL printable ASCII characters, no '/' and no leading '.'."""
    return (0 < len(label) <= MAX_LABEL and label.isascii() and label.isprintable()
            and "/" not in label and not label.startswith("."))


def _key_type_of(key: Any) -> str:
    kt = key.key_type
    if kt == KeyType.RSA:
        return "rsa2048"
    if kt == KeyType.EC:
        return "p256"
    raise HsmError(f"unsupported key type {kt!r}", code="key_type_unsupported")


def _to_cryptography(pub: Any) -> PublicKey:
    if pub.key_type == KeyType.RSA:
        n = int.from_bytes(bytes(pub[Attribute.MODULUS]), "big")
        e = int.from_bytes(bytes(pub[Attribute.PUBLIC_EXPONENT]), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    der = encode_ec_public_key(pub)
    key = serialization.load_der_public_key(der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
